"""A cheap latents → RGB preview: one linear map per latent pixel, fitted by least squares.

Each latent pixel z(p) ∈ ℝ⁴ stands for an 8×8 patch of the image, and its four numbers carry
the patch's average colour almost linearly. So, instead of running the decoder (seconds), an
intermediate latent can be shown at 1/8 resolution with

    rgb(p) ≈ W · z(p) + b          W (3, 4), b (3,), rgb in [0, 1]

W and b are fitted on pairs (z(p), mean colour of the patch p) from images encoded by the VAE:

    [W | b]ᵀ = argmin Σ_p ‖[z(p), 1] · [W | b]ᵀ − rgb(p)‖²       (ordinary least squares)

Latents are in the **diffusion scale** (the VAE's mean × `scaling_factor`), i.e. the numbers a
sampler holds, so `preview(latents)` can be called on them directly during sampling.

No coefficients are hard-coded: they depend on the VAE's weights, so they are fitted on the VAE
at hand (`LatentPreview.fit(vae, images)`, a few images are enough; `fitting_images()` draws a
generic set: colour fields, gradients, coloured discs and squares) and can be stored as plain
JSON numbers (`state_dict()` / `from_state_dict()`), as the tiny model's checkpoint does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class LatentPreview:
    weight: torch.Tensor          # (3, C): RGB from the C latent channels
    bias: torch.Tensor            # (3,)
    rmse: float | None = None     # the fit's root-mean-square error in [0, 1] pixel units

    @classmethod
    def fit_pairs(cls, latents: torch.Tensor, rgb: torch.Tensor) -> "LatentPreview":
        """Least squares on matching pixels: latents (B, C, h, w), rgb (B, 3, h, w) in [0, 1]."""
        if latents.ndim != 4 or rgb.ndim != 4 or latents.shape[0] != rgb.shape[0] \
                or latents.shape[2:] != rgb.shape[2:] or rgb.shape[1] != 3:
            raise ValueError(f"fit_pairs expects latents (B, C, h, w) and rgb (B, 3, h, w) of the same B, h, w; "
                             f"got {tuple(latents.shape)} and {tuple(rgb.shape)}")
        c = latents.shape[1]
        z = latents.detach().double().cpu().movedim(1, -1).reshape(-1, c)       # (N, C)
        y = rgb.detach().double().cpu().movedim(1, -1).reshape(-1, 3)          # (N, 3)
        if z.shape[0] < c + 1:
            raise ValueError(f"fitting a {c}-channel preview needs at least {c + 1} latent pixels; got {z.shape[0]}")
        features = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)  # (N, C + 1): [z, 1]
        solution = torch.linalg.lstsq(features, y).solution                    # (C + 1, 3) = [W | b]ᵀ
        preview = cls(weight=solution[:c].T.float().contiguous(), bias=solution[c].float().contiguous())
        preview.rmse = (preview(latents.detach().cpu().float()) - rgb.detach().cpu().float()).pow(2).mean().sqrt().item()
        return preview

    @classmethod
    @torch.no_grad()
    def fit(cls, vae, images: torch.Tensor, *, target: str = "images", batch_size: int = 4) -> "LatentPreview":
        """Fit on a VAE: images (N, 3, H, W) in [-1, 1] are encoded (the posterior mean, times
        `vae.scaling_factor`); each latent pixel is paired with the mean colour of its f×f patch of
        the input images (`target="images"`) or of their reconstruction (`target="decoded"`, what
        the preview stands in for; costs one decode per image)."""
        if target not in ("images", "decoded"):
            raise ValueError(f"target must be 'images' or 'decoded'; got {target!r}")
        f = vae.config.downsample_factor
        latents, rgb = [], []
        for batch in images.split(batch_size):
            z = vae.encode(batch).mode()
            pixels = batch if target == "images" else vae.decode(z).clamp(-1, 1)
            latents.append(z * vae.scaling_factor)
            rgb.append(F.avg_pool2d((pixels.float() + 1) / 2, f))
        return cls.fit_pairs(torch.cat(latents), torch.cat(rgb))

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) in the diffusion scale → RGB (B, 3, h, w) in [0, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.weight.shape[1]:
            raise ValueError(f"this preview maps latents of shape (B, {self.weight.shape[1]}, h, w); "
                             f"got {tuple(latents.shape)}")
        w = self.weight.to(latents.device, latents.dtype)
        b = self.bias.to(latents.device, latents.dtype)
        return (torch.einsum("oc,bchw->bohw", w, latents) + b[:, None, None]).clamp(0, 1)

    preview = __call__

    def to_pil(self, latents: torch.Tensor, upscale: int = 1) -> list[Image.Image]:
        """One PIL image per latent, enlarged `upscale`× with nearest-neighbour (8 gives the image size)."""
        rgb = (self(latents.detach()).float().cpu() * 255).round().to(torch.uint8)
        out = []
        for img in rgb.permute(0, 2, 3, 1).numpy():
            pil = Image.fromarray(np.ascontiguousarray(img))
            out.append(pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST) if upscale != 1 else pil)
        return out

    def state_dict(self) -> dict:
        """Plain JSON-serialisable numbers, e.g. for a checkpoint's metadata."""
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist(), "rmse": self.rmse}

    @classmethod
    def from_state_dict(cls, d: dict) -> "LatentPreview":
        weight, bias = torch.tensor(d["weight"], dtype=torch.float32), torch.tensor(d["bias"], dtype=torch.float32)
        if weight.ndim != 2 or weight.shape[0] != 3 or bias.shape != (3,):
            raise ValueError(f"a latent preview needs weight (3, C) and bias (3,); got {tuple(weight.shape)} "
                             f"and {tuple(bias.shape)}")
        return cls(weight=weight, bias=bias, rmse=d.get("rmse"))


def fitting_images(size: int = 64, seed: int = 0) -> torch.Tensor:
    """A generic set of pictures to fit a preview on, drawn here so nothing is downloaded:
    flat colour fields (12 hues at two strengths, and 5 greys), four gradients, and 16 discs or
    squares of random colours on random greys. (N, 3, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    hues = torch.arange(12) / 12
    fields = [_hsv(h, s, v) for h in hues for s, v in ((0.85, 0.9), (0.5, 0.6))]
    fields += [torch.full((3,), level) for level in (0.0, 0.25, 0.5, 0.75, 1.0)]
    pics = [c[:, None, None].expand(3, size, size) for c in fields]
    ramp = torch.linspace(0, 1, size)
    x, y = ramp[None].expand(size, size), ramp[:, None].expand(size, size)
    pics += [torch.stack([x, y, 1 - x]), torch.stack([1 - y, x.flip(1), y]), torch.stack([y, 1 - x, x * y]),
             torch.stack([x * y, (x + y) / 2, 1 - y])]
    for i in range(16):
        colour = _hsv(torch.rand((), generator=g), 0.6 + 0.4 * torch.rand((), generator=g), 0.9)
        background = torch.rand((), generator=g) * torch.ones(3)
        cx, cy, r = (0.3 + 0.4 * torch.rand(3, generator=g)) * size
        r = r / 2
        inside = ((x * size - cx) ** 2 + (y * size - cy) ** 2 < r ** 2) if i % 2 else \
            (((x * size - cx).abs() < r) & ((y * size - cy).abs() < r))
        pics.append(torch.where(inside, colour[:, None, None], background[:, None, None]))
    return torch.stack(pics) * 2 - 1


def _hsv(h, s, v) -> torch.Tensor:
    """One HSV colour → RGB (3,) in [0, 1]."""
    h, s, v = (torch.as_tensor(float(t)) for t in (h, s, v))
    k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
