"""Shared helpers for the parity tests: random weights for every parameter, and a cache.

Reference models (diffusers, transformers, CompVis `ldm`) initialise some output layers to zero,
which would make a comparison pass trivially, so every test randomises *every* parameter first.
Generated reference checkpoints are cached under .cache/tests (git-ignored) so that repeated
runs skip the slow construction; delete the folder to rebuild them.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "tests"


def cache_dir(*parts: str) -> Path:
    path = CACHE.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every floating parameter and buffer with seeded random values, in place.

    Matrices and conv kernels get N(0, 1/fan_in) so activations stay O(1) through deep stacks;
    1-D weights (norm scales) get 1 + N(0, 0.2²); 1-D biases N(0, 0.2²). Nothing is left at a
    value (0 or 1) that could hide a missing or swapped tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.state_dict(keep_vars=True).items()):
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.ndim >= 2:
            fan_in = p[0].numel()
            value = noise / math.sqrt(fan_in)
        elif name.endswith("weight"):
            value = 1 + 0.2 * noise
        else:
            value = 0.2 * noise
        p.copy_(value.to(p.dtype))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64: the relative error the parity tests bound."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
