"""Notebook 09 (customising): spherical interpolation of starting noise, the web UI's emphasis, …"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..interpolation import slerp as _slerp
from ..lora import lora_delta as _lora_delta
from ..weighted_text import emphasis as _emphasis
from .core import Case, Exercise, Mistake, register


# ------------------------------------------------------------------------------------- slerp

def _slerp_cases() -> list[Case]:
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    c = torch.randn(2, 3, generator=g)
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return [Case("a, b two noises (1, 4, 8, 8), t = 0.5", (a, b, 0.5)),
            Case("a, b two noises (1, 4, 8, 8), t = 0.2", (a, b, 0.2)),
            Case("a, b of different norms (3·a and b), t = 0.7", (3 * a, b, 0.7)),
            Case("a, b (2, 3) treated as one vector of 6 numbers, t = 0.3", (c, torch.randn(2, 3, generator=g), 0.3)),
            Case("a = [[1, 0], [0, 1]], b = its negative rotation [[0, 1], [-1, 0]], t = 0.25",
                 (d, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), 0.25)),
            Case("a, b (1, 4, 8, 8), t = 0 (must give a)", (a, b, 0.0)),
            Case("a, b (1, 4, 8, 8), t = 1 (must give b)", (a, b, 1.0))]


def _slerp_written(a, b, t, *, swap=False, normalise=True, degrees=False):
    a64, b64 = a.double().flatten(), b.double().flatten()
    dot = a64 @ b64
    cos = dot / (a64.norm() * b64.norm()) if normalise else dot
    theta = torch.arccos(cos.clamp(-1, 1))
    if degrees:
        theta = theta * 180 / math.pi
    wa, wb = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    if swap:
        wa, wb = wb, wa
    return (wa * a64 + wb * b64).reshape(a.shape).to(a.dtype)


register(Exercise(
    name="slerp", notebook="09_customising",
    reference=lambda a, b, t: _slerp(a, b, t),
    cases=_slerp_cases,
    mistakes=[
        Mistake("that is the straight line between a and b; slerp walks along the circle, "
                "with the sine weights of section 1 and θ the angle between a and b.",
                lambda a, b, t: (1 - t) * a + t * b),
        Mistake("the two weights are swapped: at t = 0 the answer must be a.",
                lambda a, b, t: _slerp_written(a, b, t, swap=True)),
        Mistake("θ comes from the cosine of the angle; the plain dot product also grows with the lengths of a and b.",
                lambda a, b, t: _slerp_written(a, b, t, normalise=False)),
        Mistake("sin and arccos work in radians; no conversion to degrees.",
                lambda a, b, t: _slerp_written(a, b, t, degrees=True)),
        Mistake("you normalised the result to unit length (or a and b first); slerp keeps the inputs' "
                "lengths: use a and b as they are, only θ uses their directions.",
                lambda a, b, t: _slerp(a / a.norm(), b / b.norm(), t))],
    hint="flatten both to vectors and find θ from the cosine of their angle; then check your "
         "weights at t = 0 and t = 1 against section 1's formula: they must give a and b.",
    atol=1e-5, rtol=1e-4))


# ---------------------------------------------------------------------------------- emphasis

def _emphasis_cases() -> list[Case]:
    g = torch.Generator().manual_seed(10)
    z = 0.2 + torch.randn(1, 77, 16, generator=g)
    w = torch.ones(1, 77)
    w[0, 2:4], w[0, 6] = 1.3, 0.6                      # "(red circle:1.3) … [square]"-like multipliers
    w2 = torch.ones(2, 77)
    w2[0, 1:3], w2[1, 5:9] = 1.21, 1 / 1.1
    return [Case("z (1, 77, 16), multipliers 1 except 1.3 on tokens 2–3 and 0.6 on token 6", (z, w)),
            Case("z (1, 77, 16), every multiplier 1 (must give z back)", (z, torch.ones(1, 77))),
            Case("z (2, 77, 16) of mean about 0.2, two prompts with different multipliers",
                 (0.2 + torch.randn(2, 77, 16, generator=g), w2))]


register(Exercise(
    name="emphasis", notebook="09_customising",
    reference=_emphasis,
    cases=_emphasis_cases,
    mistakes=[
        Mistake("the weighting is right but the mean is not restored: afterwards, one "
                "factor for the whole tensor must bring its mean back to z's.",
                lambda z, w: z * w[..., None]),
        Mistake("the ratio is upside down: after the rescale the mean must equal z's, not move further away from it.",
                lambda z, w: (z * w[..., None]) * ((z * w[..., None]).mean() / z.mean())),
        Mistake("you restored each token's own mean; the web UI restores one "
                "mean, over the whole tensor (all tokens and channels).",
                lambda z, w: (z * w[..., None]) * (z.mean(-1, keepdim=True) / (z * w[..., None]).mean(-1, keepdim=True))),
        Mistake("you shifted the hidden states by the weight; a weight "
                "multiplies each token's hidden state (its row of D numbers).",
                lambda z, w: (z + (w[..., None] - 1)) * (z.mean() / (z + (w[..., None] - 1)).mean()))],
    hint="two steps, as the web UI does them (section 2): weight each token's row of D "
         "numbers, then one factor for the whole tensor that brings its mean back to z's.",
    atol=1e-5, rtol=1e-4))


# ------------------------------------------------------------------------------ nearest_rows

def _nearest_cases() -> list[Case]:
    g = torch.Generator().manual_seed(11)
    table = torch.randn(50, 8, generator=g) * torch.linspace(0.2, 3.0, 50)[:, None]   # rows of very different lengths
    near = table[7] / table[7].norm() * 0.1 + 0.02 * torch.randn(8, generator=g)      # short, pointing like row 7
    return [Case("a table (50, 8) of rows of lengths 0.2–3, a short vector pointing like row 7, k = 3", (table, near, 3)),
            Case("the same table, a random vector, k = 5", (table, torch.randn(8, generator=g), 5)),
            Case("the same table, row 20 itself, k = 1", (table, table[20].clone(), 1))]


def _nearest_reference(table, vector, k):
    # what sdlearn.ti_train.nearest_words ranks by: cosine similarity, best first
    return F.cosine_similarity(table, vector[None], dim=-1).topk(k).indices


register(Exercise(
    name="nearest_rows", notebook="09_customising",
    reference=_nearest_reference,
    cases=_nearest_cases,
    mistakes=[
        Mistake("you ranked by the plain dot product, which favours long rows; divide by both lengths "
                "(cosine similarity) so that only the direction counts.",
                lambda t, v, k: (t @ v).topk(k).indices),
        Mistake("you ranked by distance ‖E_i − v‖; a learned vector is usually longer or shorter than "
                "the words' rows, so compare directions: cosine similarity.",
                lambda t, v, k: (-(t - v).norm(dim=-1)).topk(k).indices),
        Mistake("those are the least similar rows: topk picks the largest values, so rank by the cosine "
                "itself, not by its negative (or use largest=True).",
                lambda t, v, k: (-F.cosine_similarity(t, v[None], dim=-1)).topk(k).indices)],
    hint="rank the rows by direction only (cosine similarity): what must the dot "
         "product be divided by, and are your k indices ordered best first?",
    atol=0, rtol=0))


# -------------------------------------------------------------------------------- lora_delta

def _delta_cases() -> list[Case]:
    g = torch.Generator().manual_seed(12)
    return [Case("down (4, 32), up (64, 4), alpha = 2, scale = 1", (torch.randn(4, 32, generator=g),
                                                                     torch.randn(64, 4, generator=g), 2.0, 1.0)),
            Case("down (8, 16), up (16, 8), alpha = 8 (α = r), scale = 0.5", (torch.randn(8, 16, generator=g),
                                                                             torch.randn(16, 8, generator=g), 8.0, 0.5)),
            Case("down (1, 10), up (6, 1) (rank 1), alpha = 4, scale = -1", (torch.randn(1, 10, generator=g),
                                                                            torch.randn(6, 1, generator=g), 4.0, -1.0)),
            Case("down (2, 12), up (5, 2), alpha = None (files without alpha), scale = 0.8",
                 (torch.randn(2, 12, generator=g), torch.randn(5, 2, generator=g), None, 0.8))]


def _alpha(alpha, r):
    return r if alpha is None else alpha


register(Exercise(
    name="lora_delta", notebook="09_customising",
    reference=lambda down, up, alpha, scale: _lora_delta(down, up, alpha, scale),
    cases=_delta_cases,
    mistakes=[
        Mistake("the factor is α / r, with r the rank (down.shape[0]); you multiplied α by r.",
                lambda d, u, a, s: s * _alpha(a, d.shape[0]) * d.shape[0] * (u @ d)),
        Mistake("the file's alpha is missing: section 4's update is rescaled by α / r.",
                lambda d, u, a, s: s * (u @ d)),
        Mistake("the user's scale is missing: it multiplies the whole update (scale 0 = no LoRA).",
                lambda d, u, a, s: _alpha(a, d.shape[0]) / d.shape[0] * (u @ d)),
        Mistake("a file without alpha means α = r (a factor of 1), not α = 1.",
                lambda d, u, a, s: s * (1.0 if a is None else a) / d.shape[0] * (u @ d)),
        Mistake("the rank is the short side shared by the two factors, down.shape[0] (= up.shape[1]); you "
                "divided by another dimension.",
                lambda d, u, a, s: s * _alpha(a, d.shape[0]) / d.shape[1] * (u @ d))],
    hint="ΔW is (out, in) like the layer's weight: which product of up and down has that shape, and "
         "which factors of section 4 scale it? (What is r, and what is α when alpha is None?)",
    atol=1e-5, rtol=1e-4))
