"""Notebook 04 (the UNet): the timestep embedding, a ResBlock, multi-head attention, the skips."""
from __future__ import annotations

import math

import torch

from .. import unet
from .core import Case, Exercise, Mistake, register


def _embedding_cases() -> list[Case]:
    return [Case("t = [0, 1, 500, 999], dim = 320", (torch.tensor([0, 1, 500, 999]), 320)),
            Case("t = [261.5] (a fractional timestep), dim = 320", (torch.tensor([261.5]), 320)),
            Case("t = [10, 20], dim = 8", (torch.tensor([10, 20]), 8))]


def _sin_first(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None].float() * freqs
    return torch.cat([a.sin(), a.cos()], dim=-1)


def _shifted_frequencies(t, dim):          # diffusers' downscale_freq_shift=1: divides by half − 1
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
    a = t[:, None].float() * freqs
    return torch.cat([a.cos(), a.sin()], dim=-1)


def _interleaved(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None].float() * freqs
    return torch.stack([a.cos(), a.sin()], dim=-1).flatten(1)


def _rising_frequencies(t, dim):           # ω_i = 10000^(+i/half): the exponent's sign forgotten
    half = dim // 2
    freqs = torch.exp(math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None].float() * freqs
    return torch.cat([a.cos(), a.sin()], dim=-1)


register(Exercise(
    name="timestep_embedding", notebook="04_unet", capstone=True,
    reference=lambda t, dim: unet.timestep_embedding(t, dim),
    cases=_embedding_cases,
    mistakes=[Mistake("your embedding starts with sin; SD puts the cos half first, then the sin half.", _sin_first),
              Mistake("the frequencies divide by dim/2, not dim/2 − 1: ω_i = 10000^(−i / (dim/2)).", _shifted_frequencies),
              Mistake("cos and sin are interleaved (cos, sin, cos, sin, …); SD puts all the cos values first, "
                      "then all the sin values (torch.cat, not torch.stack).", _interleaved),
              Mistake("the frequencies should fall from 1 to about 1/10000: ω_i = exp(−ln(10000)·i/(dim/2)). "
                      "Check the sign of the exponent.", _rising_frequencies)],
    hint="compare your first row (t = 0) with what cos and sin give at 0: the first half should be ones.",
    atol=1e-4, rtol=1e-4))
