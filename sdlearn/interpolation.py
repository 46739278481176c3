"""Morphing between two seeds or two prompts: spherical interpolation, and why not a straight line.

Starting noise x_T ~ N(0, I) in d dimensions has a norm of almost exactly √d (the chi
distribution concentrates: √d ± 0.7). The sampler expects noise of that norm. A straight line
between two independent draws a and b leaves that shell:

    lerp(a, b, t) = (1 − t)·a + t·b,    ‖lerp‖² ≈ ((1 − t)² + t²) · d   (a ⟂ b: their dot ≈ 0)

so half way the norm is √½ ≈ 0.71 of what the sampler expects, and the picture comes out washed
out (as if the first steps had removed too much noise). Spherical interpolation moves along the
great circle from a to b instead (Shoemake 1985):

    θ = arccos(⟨a, b⟩ / (‖a‖‖b‖))
    slerp(a, b, t) = sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b

For ‖a‖ = ‖b‖ every point keeps that norm, and the angle from a grows linearly in t. When a and b
are (nearly) parallel, sin θ → 0 and the formula is 0/0: there lerp is the same curve, so it is
used (|cos θ| > `DOT_THRESHOLD`, the common 0.9995).

Text conditioning (B, 77, width) is interpolated the same way token by token (each position's
vector separately): CLIP's hidden states are not Gaussian, but slerp keeps their norms, which
lerp shrinks where the two prompts' vectors point apart.
"""
from __future__ import annotations

import math

import torch

from .device import cpu_generator, randn

DOT_THRESHOLD = 0.9995


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(1 − t)·a + t·b."""
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, dim: int | None = None) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1).

    dim=None treats each tensor as one vector (starting noise: the whole (…, 4, h, w) block);
    dim=-1 interpolates every vector along that axis on its own (text conditioning: each token's
    hidden state). Computed in float64, returned in a's dtype.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two tensors of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t={t}: expected a fraction in [0, 1] (0 gives a, 1 gives b)")
    a64, b64 = a.double(), b.double()
    if dim is None:
        a64, b64 = a64.reshape(1, -1), b64.reshape(1, -1)
    else:
        a64, b64 = a64.movedim(dim, -1), b64.movedim(dim, -1)
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    cos = ((a64 * b64).sum(-1, keepdim=True) / (na * nb).clamp_min(1e-30)).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    parallel = cos.abs() > DOT_THRESHOLD
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / safe)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    out = wa * a64 + wb * b64
    out = out.reshape(a.shape) if dim is None else out.movedim(-1, dim)
    return out.to(a.dtype)


def path(a: torch.Tensor, b: torch.Tensor, frames: int, *, kind: str = "slerp", dim: int | None = None) -> list[torch.Tensor]:
    """`frames` evenly spaced points from a to b (both ends included), by "slerp" or "lerp"."""
    if frames < 2:
        raise ValueError(f"frames={frames}: a path needs at least 2 frames (the two ends)")
    if kind not in ("slerp", "lerp"):
        raise ValueError(f"kind={kind!r}: expected 'slerp' or 'lerp'")
    ts = [k / (frames - 1) for k in range(frames)]
    if kind == "lerp":
        return [lerp(a, b, t) for t in ts]
    return [slerp(a, b, t, dim=dim) for t in ts]


def norm_ratio(x: torch.Tensor) -> float:
    """‖x‖ / √d: 1 for standard Gaussian noise of d elements (up to ±0.7/√d)."""
    return x.double().norm().item() / math.sqrt(x.numel())


def seed_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The unit starting noise `generate(seed=seed)` draws for `shape` (CPU generator, as diffusers)."""
    return randn(shape, cpu_generator(seed), dtype=dtype)
