"""Notebook 07 (attention maps): cross-attention probabilities, per-word maps, the strongest word."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import attention, attention_maps, widgets
from .core import Case, Exercise, Mistake, register

# ------------------------------------------------------------- cross-attention probabilities


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)          # (B, heads, N, d)


def _probs_reference(q, k, heads):
    return attention.attention_probs(_heads(q, heads), _heads(k, heads))


def _probs_cases() -> list[Case]:
    g = torch.Generator().manual_seed(7)

    def case(b, nq, c, heads, label):
        q, k = torch.randn(b, nq, c, generator=g), torch.randn(b, 77, c, generator=g)
        return Case(f"q {tuple(q.shape)}, k {tuple(k.shape)}, {heads} heads{label}", (q, k, heads))
    return [case(2, 16, 32, 4, ""), case(1, 64, 64, 8, " (SD's head count)"), case(1, 4, 8, 1, " (one head)")]


def _probs_over_pixels(q, k, heads):
    d = q.shape[-1] // heads
    return (_heads(q, heads) @ _heads(k, heads).transpose(-1, -2) / d ** 0.5).softmax(dim=-2)


def _probs_unscaled(q, k, heads):
    return (_heads(q, heads) @ _heads(k, heads).transpose(-1, -2)).softmax(dim=-1)


def _probs_scaled_by_width(q, k, heads):
    return (_heads(q, heads) @ _heads(k, heads).transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)


def _probs_heads_split_wrongly(q, k, heads):
    def split(x):
        b, n, c = x.shape
        return x.reshape(b, heads, n, c // heads)
    d = q.shape[-1] // heads
    return (split(q) @ split(k).transpose(-1, -2) / d ** 0.5).softmax(dim=-1)


register(Exercise(
    name="cross_attention_probs", notebook="07_attention_and_guidance",
    reference=_probs_reference,
    cases=_probs_cases,
    mistakes=[Mistake("your rows do not sum to 1 over the 77 tokens: each latent pixel spreads one unit of "
                      "attention over the text tokens, so the softmax runs along the token axis.",
                      _probs_over_pixels),
              Mistake("the scores are not scaled: did you divide Q Kᵀ by √d?", _probs_unscaled),
              Mistake("d in √d is the size of one head (C / heads), not the full width C.", _probs_scaled_by_width),
              Mistake("the heads are split wrongly: each token's C channels split into `heads` groups of d, "
                      "so reshaping (B, N, C) straight to (B, heads, N, d) mixes tokens between heads.",
                      _probs_heads_split_wrongly)],
    hint="check the shapes on the way: per head, Q is (Nq, d) and K is (77, d), and every row of the "
         "answer sums to 1.",
    atol=1e-5, rtol=1e-4))


# ----------------------------------------------------------------------------- per-word maps

def _maps_reference(probs, token_positions, size):
    """The package's aggregation (CrossAttentionMaps, the recorder `generate` uses), then each
    word's token maps summed as attention_maps.word_maps does."""
    acc = attention_maps.CrossAttentionMaps(rows=slice(1, 2))
    for i, p in enumerate(probs):
        acc.add(f"layer{i}.attn2", p)
    tokens = acc.token_maps(tuple(size))[0]                                   # (77, H, W)
    return torch.stack([tokens[[j + 1 for j in word]].sum(dim=0) for word in token_positions])


def _maps_cases() -> list[Case]:
    g = torch.Generator().manual_seed(77)

    def layer(heads, side):
        return (3 * torch.randn(2, heads, side * side, 77, generator=g)).softmax(dim=-1)
    return [Case("one layer, (2, 4 heads, 4×4 pixels, 77), words at [[0], [1], [2]], size (4, 4)",
                 ([layer(4, 4)], [[0], [1], [2]], (4, 4))),
            Case("three layers at 8×8, 4×4, 8×8 (2 heads), words at [[0], [1, 2], [4]], size (16, 16)",
                 ([layer(2, 8), layer(2, 4), layer(2, 8)], [[0], [1, 2], [4]], (16, 16))),
            Case("two layers at 2×2 (8 heads), words at [[3], [0, 1, 2]], size (6, 6)",
                 ([layer(8, 2), layer(8, 2)], [[3], [0, 1, 2]], (6, 6)))]


def _word_maps_with(probs, token_positions, size, *, first=1, transpose=False, both_rows=False, pieces="sum"):
    """Per-word maps written out, with switches for the planted mistakes."""
    total = 0
    for p in probs:
        a = p.mean(dim=(0, 1)) if both_rows else p[1].mean(dim=0)           # (Nq, 77)
        side = int(round(a.shape[0] ** 0.5))
        grid = a.T.reshape(77, side, side)
        if transpose:
            grid = grid.transpose(1, 2)
        total = total + F.interpolate(grid[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    tokens = total / len(probs)
    reduce = (lambda m: m.sum(dim=0)) if pieces == "sum" else (lambda m: m.mean(dim=0))
    return torch.stack([reduce(tokens[[j + first for j in word]]) for word in token_positions])


register(Exercise(
    name="word_maps", notebook="07_attention_and_guidance",
    reference=_maps_reference,
    cases=_maps_cases,
    mistakes=[Mistake("each map is one token early: column 0 of the probabilities is the start token, which "
                      "is not part of the prompt, so the prompt's token j is column j + 1.",
                      lambda p, t, s: _word_maps_with(p, t, s, first=0)),
              Mistake("your maps are transposed: the Nq query pixels run row by row (pixel p is row p // w, "
                      "column p % w), so fold a column of Nq values straight into (h, w).",
                      lambda p, t, s: _word_maps_with(p, t, s, transpose=True)),
              Mistake("you averaged over the batch as well as the heads: row 0 is the empty prompt's call, "
                      "row 1 the prompt's; the word maps come from row 1 alone.",
                      lambda p, t, s: _word_maps_with(p, t, s, both_rows=True)),
              Mistake("a word of several BPE tokens gets the sum of its tokens' maps, not their mean "
                      "(each token took its own share of the attention).",
                      lambda p, t, s: _word_maps_with(p, t, s, pieces="mean"))],
    hint="take one layer and one word first: which row of the batch is the prompt's, "
         "which axis holds the heads, and how does a column of Nq values become the "
         "layer's grid? A pixel's maps over all 77 tokens should add up to 1.",
    atol=1e-5, rtol=1e-4))


# --------------------------------------------------------------------------- the strongest word

def _strongest_cases() -> list[Case]:
    g = torch.Generator().manual_seed(70)
    scales = torch.tensor([3.0, 1.0, 0.5, 2.0])[:, None, None]       # some words take more attention
    maps = torch.rand(4, 8, 8, generator=g) * scales
    return [Case("4 maps of 8×8 at different scales", (maps,)),
            Case("3 maps of 16×12", (torch.rand(3, 16, 12, generator=g) * torch.tensor([1.0, 4.0, 2.0])[:, None, None],)),
            Case("one map of 5×5", (torch.rand(1, 5, 5, generator=g),))]


register(Exercise(
    name="strongest_word", notebook="07_attention_and_guidance",
    reference=attention_maps.strongest_word,
    cases=_strongest_cases,
    mistakes=[Mistake("compare the maps on a common scale: a word that takes more attention everywhere wins "
                      "every pixel unless each map is first divided by its own maximum.",
                      lambda m: m.argmax(dim=0)),
              Mistake("each map should be scaled so that its peak is 1, not so that it sums to 1: a word "
                      "spread wide would otherwise lose even where it peaks.",
                      lambda m: (m / m.sum(dim=(1, 2), keepdim=True)).argmax(dim=0)),
              Mistake("the answer has one word index per pixel: take the largest over the words (the first "
                      "axis), not over a picture axis.",
                      lambda m: (m / m.amax(dim=(1, 2), keepdim=True)).argmax(dim=-1))],
    hint="check one pixel by hand against the panels above: which word wins there once every map "
         "is scaled as they are drawn? The answer is an (H, W) tensor of word indices.",
    atol=0, rtol=0))


# ------------------------------------------------------------------ a map's mass inside a box

def _mass_cases() -> list[Case]:
    g = torch.Generator().manual_seed(11)
    heat = torch.rand(8, 8, generator=g) ** 3
    box = torch.zeros(8, 8, dtype=torch.bool)
    box[1:4, 2:7] = True
    peaked = torch.zeros(16, 16)
    peaked[3, 4], peaked[10, 12] = 3.0, 1.0
    corner = torch.zeros(16, 16, dtype=torch.bool)
    corner[:8, :8] = True
    return [Case("a random 8×8 map and a 3×5 box", (heat, box)),
            Case("two peaks (3 inside, 1 outside) on 16×16, the top-left quarter", (peaked, corner)),
            Case("a uniform 8×8 map and the same 3×5 box", (torch.full((8, 8), 0.25), box))]


def _box_area(heat, region):
    return region.float().mean().item()


def _mean_inside(heat, region):
    return heat[region].mean().item()


def _max_ratio(heat, region):
    return (heat[region].max() / heat.max()).item()


def _normalised_by_outside(heat, region):
    return (heat[region].sum() / heat[~region].sum()).item()


register(Exercise(
    name="mass_inside", notebook="07_attention_and_guidance",
    reference=lambda heat, region: widgets.mass_inside(heat, region), cases=_mass_cases,
    mistakes=[Mistake("that is the box's share of the picture, whatever the map; weigh each pixel by the map.",
                      _box_area),
              Mistake("that is the map's mean value inside the box; the question is what fraction of the "
                      "map's total lies inside.", _mean_inside),
              Mistake("that compares the peaks; the question is about all of the "
                      "map: how much of its total lies inside the box?",
                      _max_ratio),
              Mistake("inside over outside compares the two parts; the "
                      "question is the inside's share of the whole map.", _normalised_by_outside)],
    hint="what fraction of the map's total lies inside the box? Check the two cases: 1 when all of "
         "the map is inside, the box's share of the picture when the map is uniform."))
