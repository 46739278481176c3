"""One attention function for the whole model, and an opt-in recorder of attention maps.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V            (Vaswani et al., 2017)

CLIP (causal self-attention), the UNet (self- and cross-attention) and the VAE (single-head
self-attention over pixels) all call `attention()`. It runs on PyTorch's fused
`scaled_dot_product_attention`, which never materialises the (N × N) matrix.

Recording the probabilities softmax(Q Kᵀ / √d) is a separate, opt-in path: inside
`with AttentionRecorder() as rec:` every attention call that carries a `tag` also computes the
probability matrix by hand and hands it to the recorder. The output is still the SDPA output,
so results are bit-identical with and without recording; with no recorder active the cost is
one empty-list check.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

_active: list["AttentionRecorder"] = []


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
              causal: bool = False, tag: str | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on already projected tokens.

    q (B, Nq, C), k (B, Nk, C), v (B, Nk, C) → (B, Nq, C); C is split into `heads` heads of
    size C / heads. `causal=True` lets token i attend only to tokens ≤ i (CLIP's text encoder).
    `tag` names the call site (e.g. "mid_block.attentions.0.transformer_blocks.0.attn2") so a
    recorder can tell the layers apart. `key_mask` (B, Nk) bool, True = may be attended to,
    hides keys as well (transformers' `attention_mask`; compel's prompt weighting uses it).
    """
    b, nq, c = q.shape
    d = c // heads
    q = q.view(b, nq, heads, d).transpose(1, 2)            # (B, h, Nq, d)
    k = k.view(b, -1, heads, d).transpose(1, 2)            # (B, h, Nk, d)
    v = v.view(b, -1, heads, d).transpose(1, 2)
    if key_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        allowed = key_mask[:, None, None, :].to(torch.bool)               # (B, 1, 1, Nk)
        if causal:
            allowed = allowed & torch.ones(nq, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - nq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    if _active and tag is not None:
        _record(tag, q, k, causal, key_mask)
    return out.transpose(1, 2).reshape(b, nq, c)


def attention_probs(q: torch.Tensor, k: torch.Tensor, causal: bool = False,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) for per-head tensors (B, h, Nq, d), (B, h, Nk, d) → (B, h, Nq, Nk);
    key_mask (B, Nk) bool hides the keys marked False."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        nq, nk = scores.shape[-2:]
        mask = torch.ones(nq, nk, dtype=torch.bool, device=scores.device).tril(nk - nq)
        scores = scores.masked_fill(~mask, float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].to(torch.bool), float("-inf"))
    return scores.softmax(dim=-1)


def _record(tag: str, q: torch.Tensor, k: torch.Tensor, causal: bool, key_mask: torch.Tensor | None = None) -> None:
    wanted = [r for r in _active if r.wants(tag)]
    if not wanted:
        return
    probs = attention_probs(q, k, causal, key_mask)
    for rec in wanted:
        rec.add(tag, probs)


class AttentionRecorder:
    """Collect attention probabilities while a model runs.

        with AttentionRecorder(lambda tag: tag.endswith("attn2")) as rec:
            unet(latents, t, context)
        rec.maps["mid_block.attentions.0.transformer_blocks.0.attn2"]  # list, one per call
        # each entry: (B, heads, Nq, Nk) float32 on the CPU, rows summing to 1

    `select` picks the tags to keep (default: all). Recorders nest; each sees every call.
    """

    def __init__(self, select: Callable[[str], bool] | None = None, to_cpu: bool = True):
        self.select = select
        self.to_cpu = to_cpu
        self.maps: dict[str, list[torch.Tensor]] = defaultdict(list)

    def wants(self, tag: str) -> bool:
        return self.select is None or self.select(tag)

    def add(self, tag: str, probs: torch.Tensor) -> None:
        self.maps[tag].append(probs.detach().cpu() if self.to_cpu else probs.detach())

    def clear(self) -> None:
        self.maps.clear()

    def __enter__(self) -> "AttentionRecorder":
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)


@contextmanager
def recording_paused():
    """No recorder sees the attention layers run inside the block (a model run for bookkeeping,
    such as counting FLOPs on the meta device, must not add to the maps being recorded)."""
    paused = _active[:]
    _active.clear()
    try:
        yield
    finally:
        _active[:] = paused


def tag_attention_layers(model: torch.nn.Module) -> None:
    """Give every submodule that has a `tag` attribute its qualified name inside `model`."""
    for name, module in model.named_modules():
        if hasattr(module, "tag"):
            module.tag = name
