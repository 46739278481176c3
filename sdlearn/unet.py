"""The conditional UNet of Stable Diffusion v1.x: ε_θ(z_t, t, c), the noise in a noised latent.

    z_t (B, 4, H, W) ─ conv_in ─┬─ down_blocks ─ mid_block ─ up_blocks ─ norm, SiLU, conv_out ─ ε̂ (B, 4, H, W)
                                 └──── skips, concatenated on the way up ────┘
    t ─ sinusoidal embedding ─ MLP ─ t_emb (B, 4·C₀) ──→ added inside every ResBlock
    c = CLIP text (B, 77, 768) ──→ K, V of the cross-attention inside every spatial transformer

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", on the UNet
of Ronneberger et al. 2015; reference code: CompVis `ldm/modules/diffusionmodules/openaimodel.py`
and diffusers `UNet2DConditionModel`. SD v1.5 (`UNetConfig.sd15()`): four levels of 320, 640,
1280, 1280 channels; at each level going down, two ResBlocks (each followed by a spatial
transformer at the first three levels) and a stride-2 conv (not after the last level); the
middle is ResBlock, transformer, ResBlock; going up, three ResBlocks per level, each eating one
skip, then a nearest ×2 upsample and a conv. 859.5 M parameters.

Module and parameter names are diffusers' (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`),
so a diffusers `unet/` state dict loads with `load_state_dict(strict=True)`. There are no
buffers: the sinusoidal frequencies are computed in `forward`, so the model can be built on the
meta device and loaded with `assign=True`.

Speed: the layers are plain PyTorch (`nn.Linear`, `nn.Conv2d`). On a CPU, `sdlearn.fast_cpu` swaps
in subclasses that compute the same thing faster (load_pipeline does it by default); they keep
these parameters and this state dict.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .attention import attention, recording_paused, tag_attention_layers
from .configs import UNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos first.  (B,) → (B, dim)

        ω_i = max_period^(−i / (dim/2)),  i = 0 … dim/2 − 1
        emb(t) = [cos(t·ω_0) … cos(t·ω_{dim/2−1}), sin(t·ω_0) … sin(t·ω_{dim/2−1})]

    Vaswani et al. 2017, as in diffusers' `get_timestep_embedding(flip_sin_to_cos=True,
    downscale_freq_shift=0)` (the order SD's weights were trained with). Always float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))                        # odd dim: one zero column


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoidal embedding:  t_emb = W₂ SiLU(W₁ emb(t) + b₁) + b₂.  (B, C₀) → (B, 4·C₀)"""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResBlock(nn.Module):
    """A residual block that also sees the timestep.  x (B, C_in, H, W), t_emb (B, T) → (B, C_out, H, W)

        h = conv1(SiLU(GroupNorm(x)))
        h = h + Linear(SiLU(t_emb))                   (one bias per channel and sample)
        h = conv2(dropout(SiLU(GroupNorm(h))))        (dropout is the identity at inference)
        out = shortcut(x) + h                         (shortcut: 1×1 conv when C_in ≠ C_out)
    """

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    @classmethod
    def from_config(cls, c_in: int, c_out: int, cfg: UNetConfig) -> "ResBlock":
        return cls(c_in, c_out, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(t_emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens on themselves (attn1) or on the text (attn2).

        Q = x W_q,  K = c W_k,  V = c W_v        (c = x for self-attention)
        out = softmax(Q Kᵀ / √d) V W_o + b_o      (per head, d = dim / heads)

    x (B, N, dim), context (B, M, context_dim) → (B, N, dim). `tag` is this layer's qualified
    name, filled in by `tag_attention_layers`, so an `AttentionRecorder` can tell layers apart.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])   # diffusers' to_out.1 is a dropout
        self.tag: str | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](attention(q, k, v, self.heads, tag=self.tag))


class GEGLU(nn.Module):
    """The gated GELU unit (Shazeer 2020):  [a, b] = x W + b_W;  out = a · GELU(b).  (…, dim) → (…, inner)"""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    """GEGLU to 4·dim, then back:  FF(x) = GEGLU(x) W₂ + b₂.  (B, N, dim) → (B, N, dim)"""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is diffusers' dropout slot (no weights, identity at inference): kept so that
        # the second linear is called `net.2`, as in the checkpoints.
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, feed-forward; each pre-normed and residual.

        x = x + attn1(LN(x))
        x = x + attn2(LN(x), context)
        x = x + FF(LN(x))
    (B, N, dim), (B, M, context_dim) → (B, N, dim)
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Transformer blocks on the pixels of a feature map (diffusers: `Transformer2DModel`).

        h = proj_in(GroupNorm(x))                  1×1 conv
        tokens = h as (B, H·W, C)                  one token per pixel
        tokens = TransformerBlock(tokens, context) × depth
        out = x + proj_out(tokens as (B, C, H, W)) 1×1 conv
    (B, C, H, W), (B, M, context_dim) → (B, C, H, W). The GroupNorm's eps is 1e-6 here (1e-5 in
    the ResBlocks), as in the reference.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    @classmethod
    def from_config(cls, channels: int, cfg: UNetConfig) -> "SpatialTransformer":
        return cls(channels, cfg.num_heads, cfg.cross_attention_dim, cfg.transformer_layers_per_block, cfg.norm_num_groups)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.reshape(b, h, w, c).permute(0, 3, 1, 2))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 conv, padding 1.  (B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉)"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size`, then a 3×3 conv.  (B, C, h, w) → (B, C, *size)

    `size` is that of the skip this output is concatenated with next: (2h, 2w) when the level
    above had even sides, (2h − 1, …) where its stride-2 conv rounded an odd side up. Nearest
    to an exact double is the ×2 repeat; otherwise source pixel ⌊i·h/H⌋, as diffusers'
    `Upsample2D(output_size=…)` does.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class DownBlock(nn.Module):
    """One level going down: (ResBlock [→ SpatialTransformer]) × n [→ Downsample].

    Every output (after each ResBlock/transformer pair and after the downsampler) is pushed on
    `skips` for the way up. (B, C_in, H, W) → (B, C_out, ⌈H/2⌉, ⌈W/2⌉) (H, W if last level).
    """

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig, has_attention: bool, add_downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(ResBlock.from_config(c_in if j == 0 else c_out, c_out, cfg) for j in range(n))
        self.attentions = nn.ModuleList(SpatialTransformer.from_config(c_out, cfg) for _ in range(n if has_attention else 0))
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if add_downsample else [])

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, t_emb)
            if self.attentions:
                x = self.attentions[j](x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """The bottom of the U: ResBlock → SpatialTransformer → ResBlock.  (B, C, h, w) → (B, C, h, w)"""

    def __init__(self, c: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock.from_config(c, c, cfg) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialTransformer.from_config(c, cfg)])

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, t_emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, t_emb)


class UpBlock(nn.Module):
    """One level going up: (concat a skip → ResBlock [→ SpatialTransformer]) × (n + 1) [→ Upsample].

    The skips are popped in the reverse order of the way down, so each ResBlock's input has
    C_prev + C_skip channels. Channel bookkeeping as in diffusers' `CrossAttnUpBlock2D`: the first
    ResBlock gets the level below (`c_prev`), the last one's skip comes from the level above
    (`c_skip_last`, the input width of this level on the way down). The upsampler brings the
    map to the size of the next skip on the stack, so odd sides round-trip exactly.
    """

    def __init__(self, c_prev: int, c_out: int, c_skip_last: int, cfg: UNetConfig, has_attention: bool,
                 add_upsample: bool):
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResBlock.from_config((c_prev if j == 0 else c_out) + (c_skip_last if j == n - 1 else c_out), c_out, cfg)
            for j in range(n))
        self.attentions = nn.ModuleList(SpatialTransformer.from_config(c_out, cfg) for _ in range(n if has_attention else 0))
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if add_upsample else [])

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), t_emb)
            if self.attentions:
                x = self.attentions[j](x, context)
        for up in self.upsamplers:
            x = up(x, skips[-1].shape[-2:])
        return x


class UNet(nn.Module):
    """ε_θ(z_t, t, c): predicts the noise in latents z_t at timestep t given the text c.

    latents (B, in_channels, H, W), timesteps (an int or float, a 0-d tensor, or a 1-D tensor of
    length 1 or B), context (B, M, cross_attention_dim) → (B, out_channels, H, W).
    Any H, W ≥ 1: each stride-2 conv rounds an odd side up, and each upsampler returns to the
    size of the skip it meets (as diffusers' `UNet2DConditionModel` with `upsample_size`), so an
    image side only has to be a multiple of the VAE's factor 8.
    """

    def __init__(self, config: UNetConfig = UNetConfig.sd15()):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        levels = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg, cfg.attention_levels[i], add_downsample=i < levels - 1)
            for i in range(levels))
        self.mid_block = MidBlock(ch[-1], cfg)
        # Up block i works at level L-1-i; its last skip comes from the level above it.
        up = list(reversed(ch))
        attn_up = list(reversed(cfg.attention_levels))
        self.up_blocks = nn.ModuleList(
            UpBlock(up[max(i - 1, 0)], up[i], up[min(i + 1, levels - 1)], cfg, attn_up[i], add_upsample=i < levels - 1)
            for i in range(levels))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        tag_attention_layers(self)

    @property
    def downsample_factor(self) -> int:
        """How many times smaller the deepest feature maps are than the latents (8 for SD v1.5).
        Not a constraint on the input size: odd sides are rounded up on the way down."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, latents: torch.Tensor, timesteps, context: torch.Tensor) -> torch.Tensor:
        t = self._check_inputs(latents, timesteps, context)
        t_emb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(latents.dtype))

        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, t_emb, context, skips)
        x = self.mid_block(x, t_emb, context)
        for block in self.up_blocks:
            x = block(x, t_emb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def _check_inputs(self, latents: torch.Tensor, timesteps, context: torch.Tensor) -> torch.Tensor:
        """Validate shapes; return the timesteps as a 1-D tensor of length B."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects latents of shape (B, {cfg.in_channels}, H, W); got {tuple(latents.shape)}")
        b, _, h, w = latents.shape
        if h == 0 or w == 0:
            raise ValueError(f"UNet latents must have H and W of at least 1; got {h}×{w}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.cross_attention_dim:
            raise ValueError(f"UNet expects context of shape ({b}, tokens, {cfg.cross_attention_dim}) "
                             f"(batch as the latents, width = cross_attention_dim); got {tuple(context.shape)}. "
                             "Pass the text encoder's last hidden state for this UNet's text encoder.")
        t = torch.as_tensor(timesteps, device=latents.device)
        if t.ndim == 0:
            t = t[None]
        if t.ndim != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"timesteps must be a number or a tensor of shape (), (1,) or ({b},); got {tuple(t.shape)}")
        return t.expand(b)

    @torch.no_grad()
    def trace_shapes(self, latents: torch.Tensor, timesteps, context: torch.Tensor) -> list[tuple[str, tuple, tuple]]:
        """Run once and list (block name, input shape, output shape) for every block of the U,
        in the order they run: conv_in, each ResBlock / transformer / down- or upsampler, the
        middle, conv_out. The up path's ResBlock inputs show the concatenated skip channels."""
        rows, hooks = [], []
        names = ["conv_in", "conv_norm_out", "conv_out"]
        for name, module in self.named_modules():
            if isinstance(module, (ResBlock, SpatialTransformer, Downsample, Upsample)):
                names.append(name)
        for name in names:
            module = self.get_submodule(name)
            hooks.append(module.register_forward_hook(
                lambda m, inp, out, name=name: rows.append((name, tuple(inp[0].shape), tuple(out.shape)))))
        try:
            self(latents, timesteps, context)
        finally:
            for hook in hooks:
                hook.remove()
        return rows


def flop_counter(config: UNetConfig, batch: int = 2) -> FlopCounterMode:
    """torch's FlopCounterMode after one UNet call at the config's native size: latents
    (batch, 4, sample_size, sample_size) and 77 tokens of context; batch 2 is one guided step.

    Counted (2 per multiply-add of the matrix products, convolutions and attention) on a UNet built
    on the meta device: no memory, no arithmetic, about 0.1 s. Attention recording is paused so
    that no meta tensor reaches a recorder. `counter.get_flop_counts()` holds the counts per
    module (each module's count includes its children's)."""
    side = config.sample_size
    with torch.device("meta"), recording_paused():
        unet = UNet(config)
        with FlopCounterMode(display=False) as counter:
            unet(torch.zeros(batch, config.in_channels, side, side), torch.zeros(batch),
                 torch.zeros(batch, 77, config.cross_attention_dim))
    return counter


@functools.lru_cache(maxsize=None)
def flops_per_call(config: UNetConfig, batch: int = 2) -> int:
    """Floating-point operations of one UNet call at the config's native size (`flop_counter`),
    once per config. The tiny model: 0.44 GFLOP; SD v1.5: 1,607 GFLOP.
    """
    return flop_counter(config, batch).get_total_flops()
