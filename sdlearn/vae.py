"""The KL autoencoder that moves Stable Diffusion between pixels and latents.

    encoder:  x (B, 3, H, W) in [-1, 1]  →  (μ, log σ²), each (B, 4, H/8, W/8)
    sample:   z = μ + σ · ε,  ε ~ N(0, I)                      (the reparameterisation trick)
    decoder:  z (B, 4, H/8, W/8)  →  x̂ (B, 3, H, W) in [-1, 1]

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022), §3 and
appendix G; reference code: CompVis `ldm/modules/diffusionmodules/model.py` (`Encoder`,
`Decoder`) and diffusers `models/autoencoders/autoencoder_kl.py`, whose module names this file
uses so that a diffusers `vae/` state dict loads with `strict=True`.

The diffusion model never sees pixels: it works on `z · scaling_factor` (0.18215 for SD v1),
which gives the latents roughly unit variance. `encode` and `decode` here work in the VAE's own
scale; multiplying and dividing by `scaling_factor` is the caller's job.

Building blocks, all with GroupNorm(32, eps=1e-6) and SiLU:
    VAEResBlock     x + conv(SiLU(GN(conv(SiLU(GN(x))))))   (1×1 conv on x when channels change)
    VAEDownsample   pad (0, 1, 0, 1), then a 3×3 conv with stride 2 and no padding
    VAEUpsample     nearest-neighbour ×2, then a 3×3 conv
    VAEAttention    single-head self-attention over the H·W pixels, with a residual
(Named VAE… to tell them from the UNet's ResBlock, Downsample, … which also see the timestep.)
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .attention import attention, tag_attention_layers
from .configs import VAEConfig
from .device import randn

NORM_EPS = 1e-6          # every GroupNorm of the VAE (the UNet uses 1e-5)
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of log σ², as in CompVis `DiagonalGaussianDistribution`


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class VAEResBlock(nn.Module):
    """h = conv2(SiLU(norm2(conv1(SiLU(norm1(x))))));  out = shortcut(x) + h.

    (B, C_in, H, W) → (B, C_out, H, W). No timestep input: this is the VAE's ResBlock.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class VAEDownsample(nn.Module):
    """(B, C, H, W) → (B, C, H/2, W/2): zero-pad one pixel on the right and bottom only, then a
    stride-2 3×3 conv. Padding symmetrically instead (one pixel on every side) would sample every
    window one pixel up and left of where the weights expect it, at each level's own resolution:
    1 + 2 + 4 = 7 image pixels through SD's three downsamplers, a drift that shows in img2img."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEUpsample(nn.Module):
    """(B, C, H, W) → (B, C, 2H, 2W): repeat each pixel 2×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels, with a residual:

        h = GN(x) as H·W tokens of C channels;  out = x + W_o · Attention(W_q h, W_k h, W_v h)

    (B, C, H, W) → (B, C, H, W). The projections are `nn.Linear` over channels (diffusers'
    layout); the original checkpoints store them as 1×1 convs `[C, C, 1, 1]`, the same numbers.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.tag: str | None = None   # set by tag_attention_layers, e.g. "decoder.mid_block.attentions.0"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)          # (B, H·W, C)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = self.to_out[0](attention(q, k, v, heads=1, tag=self.tag))  # (B, H·W, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class VAEMidBlock(nn.Module):
    """ResBlock → attention → ResBlock at the lowest resolution. (B, C, h, w) → (B, C, h, w)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """`num_layers` ResBlocks, then (except at the last level) a downsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([VAEDownsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderBlock(nn.Module):
    """`num_layers` ResBlocks, then (except at the last level) an upsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([VAEUpsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) → (B, 2·latent_channels, H/f, W/f): the moments (μ, log σ²) stacked on channels.

    conv_in → per level: ResBlocks (+ downsample) → mid block → GN → SiLU → conv_out.
    SD v1.5: 128, 256, 512, 512 channels, two ResBlocks per level, f = 8.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, downsample=i < n - 1)
            for i in range(n)])
        self.mid_block = VAEMidBlock(ch[-1], groups)
        self.conv_norm_out = _group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) → (B, 3, f·h, f·w).

    conv_in → mid block → per level (widest first): ResBlocks (+ upsample) → GN → SiLU → conv_out.
    Each level has one ResBlock more than the encoder's (three in SD v1.5).
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], groups)
        self.up_blocks = nn.ModuleList([
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, upsample=i < n - 1)
            for i in range(n)])
        self.conv_norm_out = _group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(μ, diag σ²), from moments (B, 2C, h, w) split on channels.

        log σ² clamped to [-30, 20];  σ = exp(½ log σ²)
        sample:  z = μ + σ · ε,  ε ~ N(0, I)
        mode:    μ
        KL(q ‖ N(0, I)) = ½ Σ_{c,h,w} (μ² + σ² − 1 − log σ²)     (per image, shape (B,))
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """μ + σ·ε. The noise is drawn on the generator's device (so a CPU generator gives the
        same numbers as diffusers' `latent_dist.sample(generator)` on any device)."""
        return self.mean + self.std * randn(self.mean.shape, generator, dtype=self.mean.dtype, device=self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """The SD VAE: `encode(images) → DiagonalGaussian`, `decode(z) → images`.

        vae = AutoencoderKL(VAEConfig.sd15())
        z = vae.encode(images).sample(generator)       # images (B, 3, H, W) in [-1, 1]
        latents = z * vae.scaling_factor                # what the UNet works on
        images = vae.decode(latents / vae.scaling_factor)
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.tile: int | None = None    # decode in tiles of this many latent pixels (None: whole)
        tag_attention_layers(self)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 8 → q(z | x) on (B, 4, H/8, W/8)."""
        f, c = self.config.downsample_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"VAE.encode expects images of shape (B, {c}, H, W) with H and W multiples of {f}; "
                             f"got {tuple(images.shape)}. Resize or crop the images to a multiple of {f}.")
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """z (B, 4, h, w) in the VAE's scale (diffusion latents / scaling_factor) → (B, 3, 8h, 8w) in about [-1, 1].

        In float16 the decoder can overflow to inf/NaN (large activations in the last levels).
        When that happens the decode is repeated with float32 copies of the weights (the model
        itself stays float16) and the float32 result is returned, with a warning.

        `tile` (default: `self.tile`, None = off) decodes latents larger than tile × tile in
        overlapping tiles of that many latent pixels and blends the seams (see `_decode_tiled`):
        memory then grows with the tile, not the image — for pictures larger than 512×512 on a
        small GPU. `pipe.vae.tile = 64` turns it on for every decode of a pipeline.
        """
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"VAE.decode expects latents of shape (B, {c}, h, w); got {tuple(z.shape)}")
        tile = self.tile if tile is None else tile
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 4 or tile % 4):
            # A multiple of 4: the ¾-tile step and the ¼-tile overlap are then whole, and the tiles
            # add up to the image exactly (diffusers' tiling returns a wrong size otherwise).
            raise ValueError(f"VAE.decode: tile must be a positive multiple of 4 latent pixels (64 decodes SD "
                             f"v1.5 images in 512×512-pixel tiles), or None for no tiling; got {tile!r}")
        tiled = tile is not None and max(z.shape[-2:]) > tile
        images = self._decode_tiled(z, tile) if tiled else self._decode(z)
        if images.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(images).all():
            warnings.warn(f"VAE decode in {images.dtype} gave inf/NaN; decoding again in float32", RuntimeWarning,
                          stacklevel=2)
            images = self._decode_tiled(z, tile, self._decode_float32) if tiled else self._decode_float32(z)
        return images

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def _decode_float32(self, z: torch.Tensor) -> torch.Tensor:
        float32 = lambda module: {name: p.float() for name, p in module.named_parameters()}
        with torch.autocast(z.device.type, enabled=False):
            h = functional_call(self.post_quant_conv, float32(self.post_quant_conv), (z.float(),))
            return functional_call(self.decoder, float32(self.decoder), (h,))

    def _decode_tiled(self, z: torch.Tensor, tile: int, decode=None) -> torch.Tensor:
        """Decode tile × tile latent windows, a quarter of a tile overlapping, and cross-fade them.

        Windows start every ¾ tile; each is decoded alone, then blended into its upper and left
        neighbours' decoded images with linear ramps over the overlap (¼ tile · 8 pixels), in
        place, row by row (so a tile's left neighbour is already blended with the row above),
        and the first ¾ of each tile is kept. This is diffusers' `tiled_decode` (`enable_tiling()`)
        step for step, and gives its result. It is not the whole-image decode: every tile's
        GroupNorm normalises by that tile's own statistics, so colours can shift slightly from
        tile to tile; the cross-fades hide the seams.
        """
        decode = decode or self._decode
        f = self.config.downsample_factor
        step, blend = int(tile * 0.75), int(tile * f * 0.25)
        keep = tile * f - blend
        rows = [[decode(z[:, :, i:i + tile, j:j + tile]) for j in range(0, z.shape[3], step)]
                for i in range(0, z.shape[2], step)]
        out = []
        for i, row in enumerate(rows):
            for j, t in enumerate(row):
                if i > 0:
                    _cross_fade(rows[i - 1][j], t, blend, dim=2)
                if j > 0:
                    _cross_fade(row[j - 1], t, blend, dim=3)
            out.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        return torch.cat(out, dim=2)

    def forward(self, images: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """The reconstruction path used in training: x → q(z | x) → z → x̂.

        images (B, 3, H, W) → (x̂ (B, 3, H, W), q(z | x)); z is a sample of q, or its mean when
        `sample=False`. Training adds a KL term from `posterior.kl()` to the reconstruction loss.
        """
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self._decode(z), posterior


def _cross_fade(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Blend the start of `b` along `dim` with the end of `a`, in place: row y of the overlap becomes
    a·(1 − y/n) + b·(y/n). The weights are rounded from float64 as Python numbers would be."""
    n = min(a.shape[dim], b.shape[dim], extent)
    shape = [1, 1, 1, 1]
    shape[dim] = n
    w_b = torch.tensor([y / n for y in range(n)], dtype=b.dtype, device=b.device).view(shape)
    w_a = torch.tensor([1 - y / n for y in range(n)], dtype=b.dtype, device=b.device).view(shape)
    head, tail = b.narrow(dim, 0, n), a.narrow(dim, a.shape[dim] - n, n)
    head.copy_(tail * w_a + head * w_b)
