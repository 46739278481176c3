"""Notebook 04 (the UNet): the timestep embedding, a ResBlock, multi-head attention, the skips."""
from __future__ import annotations

import functools
import math

import torch

from .. import attention, unet
from ..checkpoint import build_empty
from ..configs import ModelConfig, UNetConfig
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
              Mistake("the exponent divides by dim/2, not dim/2 − 1 (that is "
                      "diffusers' shifted variant, which SD does not use).", _shifted_frequencies),
              Mistake("cos and sin are interleaved (cos, sin, cos, sin, …); SD puts all the cos "
                      "values first, then all the sin values, as two halves side by side.", _interleaved),
              Mistake("your frequencies rise; they should fall from 1 towards "
                      "1/10000. Check the sign of the exponent.", _rising_frequencies)],
    hint="compare your first row (t = 0) with what cos and sin give at 0: the first half should be ones.",
    atol=1e-4, rtol=1e-4))


# ------------------------------------------------------------------------------------ ResBlock

def _block(c_in: int, c_out: int, t_dim: int, groups: int, seed: int) -> unet.ResBlock:
    torch.manual_seed(seed)
    block = unet.ResBlock(c_in, c_out, t_dim, groups, eps=1e-5)
    with torch.no_grad():                  # GroupNorm's scale and shift away from 1 and 0, so they count
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return block.requires_grad_(False)


def _resblock_cases() -> list[Case]:
    torch.manual_seed(0)
    t_embed = unet.TimestepEmbedding(32, 64)
    t_emb_edges = t_embed(unet.timestep_embedding(torch.tensor([0, 999]), 32)).detach()
    g = torch.Generator().manual_seed(1)
    return [Case("batch 1, 8 → 16 channels (a 1×1 conv on the skip), x (1, 8, 5, 16), t_emb (1, 64)",
                 (_block(8, 16, 64, 4, seed=2), torch.randn(1, 8, 5, 16, generator=g) + 0.5,
                  torch.randn(1, 64, generator=g))),
            Case("16 → 16 channels (identity skip), x (2, 16, 4, 4), t_emb (2, 64)",
                 (_block(16, 16, 64, 4, seed=3), torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 64, generator=g))),
            Case("t = [0, 999] through a time-embedding MLP, 16 → 32 channels, x (2, 16, 3, 3)",
                 (_block(16, 32, 64, 8, seed=4), torch.randn(2, 16, 3, 3, generator=g), t_emb_edges))]


def _time_term(block, t_emb):
    return block.time_emb_proj(torch.nn.functional.silu(t_emb))[:, :, None, None]


def _shortcut(block, x):
    return x if block.conv_shortcut is None else block.conv_shortcut(x)


def _res_no_time(block, x, t_emb):
    silu = torch.nn.functional.silu
    h = block.conv2(silu(block.norm2(block.conv1(silu(block.norm1(x))))))
    return _shortcut(block, x) + h


def _res_no_silu(block, x, t_emb):                    # GroupNorm → conv, the activations left out
    h = block.conv1(block.norm1(x)) + _time_term(block, t_emb)
    return _shortcut(block, x) + block.conv2(block.norm2(h))


def _res_time_without_silu(block, x, t_emb):
    silu = torch.nn.functional.silu
    h = block.conv1(silu(block.norm1(x))) + block.time_emb_proj(t_emb)[:, :, None, None]
    return _shortcut(block, x) + block.conv2(silu(block.norm2(h)))


def _res_time_not_broadcast(block, x, t_emb):         # (B, C) added to (B, C, H, W): lines up with (H, W)
    silu = torch.nn.functional.silu
    h = block.conv1(silu(block.norm1(x))) + block.time_emb_proj(silu(t_emb))
    return _shortcut(block, x) + block.conv2(silu(block.norm2(h)))


def _res_no_residual(block, x, t_emb):
    silu = torch.nn.functional.silu
    h = block.conv1(silu(block.norm1(x))) + _time_term(block, t_emb)
    return block.conv2(silu(block.norm2(h)))


register(Exercise(
    name="resblock", notebook="04_unet", capstone=True,
    reference=lambda block, x, t_emb: unet.ResBlock.forward(block, x, t_emb),
    cases=_resblock_cases,
    mistakes=[Mistake("the timestep is missing: after conv1 the projected "
                      "time embedding joins, one number per channel.", _res_no_time),
              Mistake("each GroupNorm is followed by a SiLU before its conv: GroupNorm → SiLU → conv, twice.",
                      _res_no_silu),
              Mistake("the time embedding goes through a SiLU before time_emb_proj.", _res_time_without_silu),
              Mistake("the time term has shape (B, C); reshape it to (B, C, 1, 1) before adding, or it lines up "
                      "with the last two axes (H, W) instead of (B, C).", _res_time_not_broadcast),
              Mistake("the block's input must be added back at the end "
                      "(through conv_shortcut when it is not None).", _res_no_residual)],
    hint="follow section 4's formula in order: each half is GroupNorm → SiLU → conv; where does "
         "the time term join, with what shape, and what is added back at the end?",
    atol=1e-5, rtol=1e-4))


# ----------------------------------------------------------------------------------- attention

def _attention_cases() -> list[Case]:
    g = torch.Generator().manual_seed(30)
    r = lambda *shape: torch.randn(*shape, generator=g)   # noqa: E731
    return [Case("cross-attention: q (2, 6, 16), k and v (2, 77, 16), 4 heads",
                 (r(2, 6, 16) * 2, r(2, 77, 16) * 2, r(2, 77, 16), 4)),
            Case("self-attention, batch 1: q, k, v (1, 7, 8), 2 heads", (r(1, 7, 8) * 2, r(1, 7, 8) * 2, r(1, 7, 8), 2)),
            Case("one head: q (3, 5, 6), k and v (3, 4, 6), 1 head", (r(3, 5, 6), r(3, 4, 6), r(3, 4, 6), 1))]


def _heads(z, heads):
    b, n, c = z.shape
    return z.reshape(b, n, heads, c // heads).transpose(1, 2)   # (B, h, N, d)


def _merge(z):
    b, h, n, d = z.shape
    return z.transpose(1, 2).reshape(b, n, h * d)


def _att_no_scale(q, k, v, heads):
    return _merge((_heads(q, heads) @ _heads(k, heads).transpose(-1, -2)).softmax(-1) @ _heads(v, heads))


def _att_one_head(q, k, v, heads):                    # all C channels as a single head
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v


def _att_wrong_axis(q, k, v, heads):                  # normalised over the queries
    q, k, v = (_heads(z, heads) for z in (q, k, v))
    return _merge((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-2) @ v)


def _att_scaled_by_width(q, k, v, heads):             # √C instead of √d
    c = q.shape[-1]
    q, k, v = (_heads(z, heads) for z in (q, k, v))
    return _merge((q @ k.transpose(-1, -2) / c ** 0.5).softmax(-1) @ v)


def _att_split_without_transpose(q, k, v, heads):     # reshape(B, h, N, d): heads cut across tokens
    def split(z):
        b, n, c = z.shape
        return z.reshape(b, heads, n, c // heads)
    qh, kh, vh = split(q), split(k), split(v)
    out = (qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5).softmax(-1) @ vh
    return out.reshape(q.shape)


register(Exercise(
    name="attention", notebook="04_unet", capstone=True,
    reference=lambda q, k, v, heads: attention.attention(q, k, v, heads),
    cases=_attention_cases,
    mistakes=[Mistake("did you divide the scores by √d, with d the width of one head?",
                      _att_no_scale),
              Mistake("this is one head over all C channels; split C into `heads` heads of "
                      "width d, attend in each, and put the heads side by side again.", _att_one_head),
              Mistake("softmax over the keys (the last axis of Q Kᵀ): each query's weights over the keys sum "
                      "to 1.", _att_wrong_axis),
              Mistake("the scale is 1/√d with d the width of one head (C / heads), not 1/√C.", _att_scaled_by_width),
              Mistake("split the heads off the channel axis: reshape to (B, N, heads, d), then transpose to "
                      "(B, heads, N, d); a direct reshape to (B, heads, N, d) mixes tokens and channels.",
                      _att_split_without_transpose)],
    hint="check the shapes on the way: each head's q is (B, heads, N, d), its scores (B, heads, N, M), and "
         "the answer goes back to (B, N, C); scale and normalise the scores as section 5 does.",
    atol=1e-5, rtol=1e-4))


# ---------------------------------------------------------------------------------------- skips

def _skip_cases() -> list[Case]:
    tiny = UNetConfig.tiny()
    return [Case("SD v1.5, batch 1, 64×64 latents (a 512×512 image)", (UNetConfig.sd15(), 1, 64, 64)),
            Case("SD v1.5, batch 2, 9×7 latents (odd sides)", (UNetConfig.sd15(), 2, 9, 7)),
            Case("the tiny UNet, batch 1, 8×8 latents", (tiny, 1, 8, 8)),
            Case("three levels (32, 64, 96), 3 ResBlocks per level, batch 1, 5×5 latents",
                 (UNetConfig(block_out_channels=(32, 64, 96), attention_levels=(False, True, False),
                             layers_per_block=3, num_heads=4, cross_attention_dim=32), 1, 5, 5))]


def _skip_reference(config, batch, height, width):
    return list(_skip_shapes_of_package(config, batch, height, width))


@functools.lru_cache(maxsize=None)
def _skip_shapes_of_package(config, batch, height, width) -> tuple:
    """The package's UNet, built on the meta device and run once: the shapes on the skip stack
    when the last down block returns (a forward hook on it sees the stack, its fourth input)."""
    model = build_empty("unet", ModelConfig(unet=config))
    seen = []
    hook = model.down_blocks[-1].register_forward_hook(
        lambda module, inputs, output: seen.extend(tuple(s.shape) for s in inputs[3]))
    try:
        model(torch.zeros(batch, config.in_channels, height, width, device="meta"), 500,
              torch.zeros(batch, 77, config.cross_attention_dim, device="meta"))
    finally:
        hook.remove()
    return tuple(seen)


def _skips(config, batch, height, width, *, conv_in=True, downsamplers=True, half=lambda n: (n + 1) // 2,
           per_level=None, next_channels=False):
    ch = config.block_out_channels
    shapes = [(batch, ch[0], height, width)] if conv_in else []
    for i, c in enumerate(ch):
        shapes += [(batch, c, height, width)] * (config.layers_per_block if per_level is None else per_level)
        if i < len(ch) - 1:
            height, width = half(height), half(width)
            if downsamplers:
                shapes.append((batch, ch[i + 1] if next_channels else c, height, width))
    return shapes


register(Exercise(
    name="skip_shapes", notebook="04_unet",
    reference=_skip_reference,
    cases=_skip_cases,
    mistakes=[Mistake("the first skip is conv_in's output, pushed before any down block runs.",
                      lambda *a: _skips(*a, conv_in=False)),
              Mistake("each downsampler's output is pushed too (every level but the last), at the halved size.",
                      lambda *a: _skips(*a, downsamplers=False)),
              Mistake("one skip per ResBlock, not one per level: layers_per_block of them at each level.",
                      lambda *a: _skips(*a, per_level=1)),
              Mistake("a downsampler keeps its level's channels; the next level's first ResBlock changes them.",
                      lambda *a: _skips(*a, next_channels=True)),
              Mistake("a stride-2 conv with padding 1 rounds an odd side up (9 → 5), not down.",
                      lambda *a: _skips(*a, half=lambda n: n // 2))],
    hint="walk down the U of section 3 and list every push in order: what is pushed before the "
         "first level, what does each level push, and what does the last level not have?"))
