"""Per-word cross-attention maps: where in the picture each word of the prompt looked.

In every cross-attention layer (`attn2`) each latent pixel p spreads one unit of attention over
the 77 text tokens: A[h, p, k] = softmax_k(q_p · k_k / √d) for head h. A token's map at one layer
and one step is that column, A[h, :, k], seen as a (h_l × w_l) picture at the layer's resolution.
Following DAAM (Tang et al. 2022, "What the DAAM: Interpreting Stable Diffusion Using Cross
Attention"), the maps are upsampled to the image and averaged over heads, layers and steps:

    M_k = 1/N · Σ_steps Σ_layers Σ_heads  up(A[h, :, k])          (H, W) per token k
    M_word = Σ_{k ∈ word} M_k                                      (a word's BPE pieces summed)

N counts the (step, layer, head) maps. Each pixel's attention sums to 1 over the tokens, and
bilinear upsampling keeps that, so Σ_k M_k = 1 everywhere: the start token usually takes most
of it, and what is left is shared among the words.

Memory stays bounded: `CrossAttentionMaps` is an `AttentionRecorder` that, instead of keeping
every map, adds each call's head-summed maps into one running sum per layer resolution.
Upsampling is linear, so summing first and upsampling once at the end is the same as
upsampling every map.

    acc = CrossAttentionMaps(rows=slice(B, 2 * B))    # the conditional half of a CFG batch
    with acc:
        for t in timesteps: unet(...)
    token_maps = acc.token_maps((H, W))                # (B, 77, H, W)
    words = word_maps(tokenizer, prompt, token_maps[0])   # WordMaps: .words, .maps (n, H, W)
    strongest_word(words.maps)                         # (H, W): which word wins each pixel
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionRecorder


def is_cross_attention(tag: str) -> bool:
    """The UNet's cross-attention layers are the ones named `…attn2`."""
    return tag.endswith("attn2")


class CrossAttentionMaps(AttentionRecorder):
    """An AttentionRecorder that accumulates cross-attention probabilities instead of storing them.

    `rows` picks the batch rows to keep (with classifier-free guidance the batch is
    [unconditional, conditional]: keep the conditional half). `latent_size` (h, w) tells how a
    layer's Nq query pixels fold into a picture; without it the maps are taken to be square.
    """

    def __init__(self, rows: slice = slice(None), latent_size: tuple[int, int] | None = None):
        super().__init__(select=is_cross_attention, to_cpu=False)
        self.rows = rows
        self.latent_size = latent_size
        self.sums: dict[tuple[int, int], torch.Tensor] = {}   # (h_l, w_l) → (b, Nk, h_l, w_l)
        self.count = 0                                          # maps added (calls × heads)
        self.calls = 0

    def _fold(self, nq: int) -> tuple[int, int]:
        """The (h_l, w_l) of a layer with nq query pixels: the latent size halved k times."""
        if self.latent_size is None:
            side = round(nq ** 0.5)
            if side * side != nq:
                raise ValueError(f"{nq} query pixels do not form a square; pass latent_size=(h, w)")
            return side, side
        h, w = self.latent_size
        for k in range(16):
            hk, wk = -(-h // 2 ** k), -(-w // 2 ** k)        # stride-2 convs round up
            if hk * wk == nq:
                return hk, wk
        raise ValueError(f"{nq} query pixels match no downsampling of the {h}×{w} latents")

    def add(self, tag: str, probs: torch.Tensor) -> None:
        """probs (B, heads, Nq, Nk) → add Σ_heads, folded to (b, Nk, h_l, w_l), to its sum."""
        p = probs[self.rows].detach().float()
        b, heads, nq, nk = p.shape
        h, w = self._fold(nq)
        folded = p.sum(dim=1).transpose(1, 2).reshape(b, nk, h, w)
        if (h, w) in self.sums:
            self.sums[(h, w)] += folded
        else:
            self.sums[(h, w)] = folded.clone()
        self.count += heads
        self.calls += 1

    def token_maps(self, size: tuple[int, int]) -> torch.Tensor:
        """The mean map of every token, upsampled (bilinear) to `size` = (H, W): (b, Nk, H, W), ≥ 0, on the CPU."""
        if not self.sums:
            raise RuntimeError("no cross-attention was recorded; run the UNet inside `with maps:`")
        total = sum(F.interpolate(s, size=size, mode="bilinear", align_corners=False)
                    for s in self.sums.values())
        return (total / self.count).cpu()


@dataclass
class WordMaps:
    """One prompt's attention maps: `words[i]` ↔ `maps[i]` (H, W); `tokens` holds every one of the
    77 token positions (start token, the words' BPE ids, end and padding)."""
    prompt: str
    words: list[str]
    maps: torch.Tensor            # (n_words, H, W)
    tokens: torch.Tensor          # (77, H, W)
    token_index: list[list[int]]  # the token positions of each word

    def __getitem__(self, word: str | int) -> torch.Tensor:
        """The map of a word, by position or by text (its first occurrence)."""
        if isinstance(word, int):
            return self.maps[word]
        if word not in self.words:
            raise KeyError(f"{word!r} is not a word of this prompt; its words are {self.words}")
        return self.maps[self.words.index(word)]

    def __len__(self) -> int:
        return len(self.words)


def word_tokens(tokenizer, prompt: str) -> tuple[list[str], list[list[int]]]:
    """The prompt's words (CLIP's pre-tokens: "cat," is "cat" and ",") and, for each, the
    positions of its BPE ids among the 77 (position 0 is the start token). Words cut off by the
    77-token limit are left out; a word cut in the middle keeps the ids that fit."""
    last = tokenizer.model_max_length - 1           # the end token's place when the prompt is full
    words, index, pos = [], [], 1
    for piece in tokenizer.pieces(prompt):
        n = len(tokenizer.encode(piece)) - 2
        span = [k for k in range(pos, pos + n) if k < last]
        pos += n
        if span:
            words.append(piece)
            index.append(span)
    return words, index


def word_maps(tokenizer, prompt: str, token_maps: torch.Tensor) -> WordMaps:
    """token_maps (77, H, W) of one prompt → its WordMaps (each word's token maps summed)."""
    words, index = word_tokens(tokenizer, prompt)
    maps = (torch.stack([token_maps[k].sum(dim=0) for k in index]) if index
            else token_maps.new_zeros((0,) + tuple(token_maps.shape[1:])))
    return WordMaps(prompt, words, maps, token_maps, index)


def strongest_word(maps: torch.Tensor) -> torch.Tensor:
    """maps (n_words, H, W) → (H, W) long: at each pixel the index of the word whose map, scaled
    to its own maximum (as `viz.plot_word_maps` shows them), is the largest there. Scaling first
    matters: a word that takes more attention everywhere would otherwise win every pixel."""
    peak = maps.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps / peak).argmax(dim=0)
