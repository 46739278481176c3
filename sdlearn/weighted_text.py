"""Weighted fragments → a conditioning tensor, the way compel and the AUTOMATIC1111 web UI do it.

Both split a prompt's tokens into chunks of 75, encode each chunk as CLIP's usual 77 ids
[start, 75 ids, end / padding], and concatenate the chunks' hidden states along the tokens: a
150-token prompt gives a (1, 154, 768) context, which the UNet's cross-attention takes as it
takes 77 (its keys and values are just longer). They differ in how a weight acts.

AUTOMATIC1111 web UI (modules/sd_hijack_clip.py `tokenize_line`, `process_tokens`;
modules/sd_emphasis.py `EmphasisOriginal`), with its default settings:

    ids    each fragment tokenized on its own, no start/end tokens, no truncation; a textual-
           inversion embedding of n vectors is n ids, each with the fragment's weight
    chunks fill 75 ids; when a chunk is full and a comma came within its last 20 ids
           (comma_padding_backtrack = 20), the ids after that comma move on to the next chunk;
           an embedding that does not fit in what is left starts the next chunk; BREAK closes
           the chunk; a chunk is padded with the end token to 75, then wrapped [start, 75, end];
           the multipliers of start, end and padding are 1
    z      = CLIP(chunk ids)                                   (1, 77, D) per chunk
    z'     = z · w[token]                                      every hidden state scaled
    z''    = z' · mean(z) / mean(z')                           the whole chunk's mean restored
    the chunks' z'' concatenated: (1, 77·chunks, D)

compel 2.5.1 (compel/embeddings_provider.py, `Compel(..., truncate_long_prompts=False)`, its
defaults otherwise: downweight_mode MASK, split_long_text_mode SENTENCES):

    ids    each fragment tokenized on its own, an n-vector embedding's token expanded to its n
           ids (its textual-inversion manager); chunks of at most 75 ids, cut after the last "."
           among the first 75 (else the last of . , ; :, else the last word end), each chunk
           [start, ids, end, padding with the end token], 77 ids
    e      = CLIP(ids of the empty prompt)                    the "empty" conditioning
    z      = CLIP(chunk ids);  z_w = e + w · (z − e)           at tokens with w ≠ 1 (up-weighting)
    for each fragment with weight w < 1 (down-weighting): z_i = the same, but with that
           fragment's tokens hidden from every attention (attention mask 0); then
           z = Σ λ_i z_i / Σ λ_i,  λ_0 = 1 for z,  λ_i = tan((1 − w_i) · π/2)
    .blend(a, b): Σ a_k z_k / Σ a_k;  .and(): the parts' z side by side (each part weighted
           w ≠ 1 is moved from the empty prompt's: e + w (z − e))

When a prompt and its negative prompt have different lengths, the shorter one is padded with
empty-prompt chunks: compel's `pad_conditioning_tensors_to_same_length`, and the web UI's
"Pad prompt/negative prompt" option (its default instead runs the two through the UNet apart).
"""
from __future__ import annotations

import math

import torch

from .prompt_syntax import BREAK, Blend, Conjunction, Prompt, check_syntax, parse_a1111, parse_compel
from .textual_inversion import expand_ids, vector_names

CHUNK = 75                       # prompt ids per chunk; with start and end: 77
COMMA_BACKTRACK = 20             # the web UI's comma_padding_backtrack default


def fragment_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids without start and end tokens and without truncation; a multi-vector
    textual-inversion token is expanded here, after parsing, to its n ids (`expand_ids`), so the
    fragment's weight covers all n rows, as in compel and the web UI."""
    return [expand_ids(tokenizer, tokenizer.encode(t)[1:-1]) for t in texts]


# -- AUTOMATIC1111 -------------------------------------------------------------------------------

def a1111_chunks(tokenizer, fragments: list[tuple[str, float]]) -> list[tuple[list[int], list[float]]]:
    """The web UI's `tokenize_line`: fragments → chunks of 77 (ids, multipliers)."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.encoder.get(",</w>")
    added = getattr(tokenizer, "added_tokens", None) or {}
    vectors = {added[t]: len(vector_names(added, t)) for t in added}        # an embedding's first id → n
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def close():
        nonlocal ids, mults, last_comma
        pad = CHUNK - len(ids)
        chunks.append(([start] + ids + [end] * pad + [end], [1.0] + mults + [1.0] * pad + [1.0]))
        ids, mults, last_comma = [], [], -1

    for (text, weight), tokens in zip(fragments, fragment_ids(tokenizer, [t for t, _ in fragments])):
        if (text, weight) == BREAK:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                moved_ids, moved_mults = ids[last_comma + 1:], mults[last_comma + 1:]
                ids, mults = ids[:last_comma + 1], mults[:last_comma + 1]
                close()
                ids, mults = moved_ids, moved_mults
            if len(ids) == CHUNK or (ids and len(ids) + vectors.get(token, 1) > CHUNK):
                close()                              # (an embedding is never split between chunks)
            ids.append(token)
            mults.append(weight)
    if ids or not chunks:
        close()
    return chunks


def emphasis(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """The web UI's "Original" emphasis: z · w per token, then rescaled so the mean of the whole
    tensor is the original mean.   z (B, L, D), multipliers (B, L) → (B, L, D)"""
    weighted = z * multipliers[..., None]
    return weighted * (z.mean() / weighted.mean())


def encode_a1111(tokenizer, text_encoder, text: str) -> torch.Tensor:
    """A web-UI prompt → (1, 77·chunks, D)."""
    device = next(text_encoder.parameters()).device
    out = []
    for ids, mults in a1111_chunks(tokenizer, parse_a1111(text)):
        z = text_encoder(torch.tensor([ids]))
        out.append(emphasis(z, torch.tensor([mults], dtype=z.dtype, device=device)))
    return torch.cat(out, dim=1)


# -- compel --------------------------------------------------------------------------------------

def compel_split(tokenizer, ids: list[int]) -> int:
    """How many of `ids` go into the next chunk (compel's SENTENCES mode): all if they fit, else
    up to the last "." among the first 75, else the last of . , ; :, else the last word end."""
    if len(ids) <= CHUNK:
        return CHUNK
    symbols = [tokenizer.decoder[i] for i in ids[:CHUNK]]
    for fits in (lambda s: s == ".</w>", lambda s: s in (".</w>", ",</w>", ";</w>", ":</w>"),
                 lambda s: s.endswith("</w>")):
        for i in reversed(range(len(symbols))):
            if fits(symbols[i]):
                return i + 1
    return CHUNK


def compel_chunks(tokenizer, fragments: list[tuple[str, float]]):
    """Fragments → (ids, weights, ranges): ids and per-token weights (77·chunks,), and each
    fragment's (first, last) position in them (None for a fragment with no tokens)."""
    fragments = fragments or [("", 1.0)]
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    per_fragment = fragment_ids(tokenizer, [t for t, _ in fragments])
    rest = [(i, k) for k, tokens in enumerate(per_fragment) for i in tokens]     # (id, fragment)
    ids, owner = [], []
    while True:
        n = compel_split(tokenizer, [i for i, _ in rest])
        chunk, rest = rest[:n], rest[n:]
        pad = CHUNK - len(chunk)
        ids += [start] + [i for i, _ in chunk] + [end] + [tokenizer.pad_token_id] * pad
        owner += [None] + [k for _, k in chunk] + [None] * (pad + 1)
        if not rest:
            break
    weights = [1.0 if k is None else float(fragments[k][1]) for k in owner]
    ranges = []
    for k in range(len(fragments)):
        where = [p for p, o in enumerate(owner) if o == k]
        ranges.append((where[0], where[-1]) if where else None)
    return torch.tensor(ids), torch.tensor(weights), ranges


def upweight(z: torch.Tensor, empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """compel's per-token weighting: e + w · (z − e) where w ≠ 1, z itself where w = 1.
    z, empty (1, L, D), weights (L,) → (1, L, D)"""
    w = weights[None, :, None].to(z.device, z.dtype).expand(z.shape)
    return torch.where(w == 1, z, empty + (z - empty) * w)


def lerp_weights(fragment_weight: float) -> float:
    """compel's weight for the conditioning without a fragment of weight w < 1: tan((1 − w) π/2):
    0 at w = 1, 1 at w = 0.5, → ∞ as w → 0 (w is floored at 1e-5)."""
    return math.tan((1.0 - max(1e-5, fragment_weight)) * math.pi / 2)


class CompelEncoder:
    """compel's conditioning on sdlearn's tokenizer and text encoder."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        n = CHUNK + 2
        empty_ids = torch.tensor([[tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (n - 2)])
        self.empty = text_encoder(empty_ids)                                 # (1, 77, D)

    def chunks(self, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each 77-id chunk through CLIP with its attention mask, then up-weighted. → (1, L, D)"""
        n, out = CHUNK + 2, []
        for s in range(0, len(ids), n):
            z = self.text_encoder(ids[None, s:s + n], mask[None, s:s + n])
            w = weights[s:s + n]
            out.append(z if bool((w == 1).all()) else upweight(z, self.empty, w))
        return torch.cat(out, dim=1)

    def prompt(self, fragments: list[tuple[str, float]]) -> torch.Tensor:
        """compel's `get_embeddings_for_weighted_prompt_fragments` for one prompt → (1, L, D)."""
        ids, weights, ranges = compel_chunks(self.tokenizer, fragments)
        mask = torch.ones_like(ids)
        variants, lambdas = [self.chunks(ids, weights, mask)], [1.0]
        n = CHUNK + 2
        for (text, w), where in zip(fragments or [("", 1.0)], ranges):
            if w < 1 and where is not None:          # (compel fails on a weighted fragment with no tokens)
                hidden = mask.clone()
                hidden[where[0]:where[1] + 1] = 0
                hidden[0::n] = 1                     # chunks' start and last positions stay visible
                hidden[n - 1::n] = 1
                variants.append(self.chunks(ids, weights, hidden))
                lambdas.append(lerp_weights(w))
        return weighted_sum(torch.stack(variants, dim=1), lambdas)

    def part(self, part: Prompt | Blend) -> torch.Tensor:
        if isinstance(part, Prompt):
            return self.prompt(part.fragments)
        conds = pad_with_empty([self.prompt(p.fragments) for p in part.prompts], self.empty)
        if part.normalize:
            return weighted_sum(torch.stack(conds, dim=1), part.weights)
        stacked = torch.stack(conds, dim=1)
        return (stacked * torch.tensor(part.weights, dtype=stacked.dtype, device=stacked.device)[:, None, None]).sum(dim=1)

    def __call__(self, text: str) -> torch.Tensor:
        """A compel prompt → (1, 77·chunks, D), as `Compel(...)(text)`."""
        conj: Conjunction = parse_compel(text)
        out, empty_prompt = [], None
        for part, w in zip(conj.parts, conj.weights):
            z = self.part(part)
            if w != 1:
                empty_prompt = self.prompt([("", 1.0)]) if empty_prompt is None else empty_prompt
                e, z = pad_with_empty([empty_prompt, z], self.empty)
                z = e + (z - e) * w
            out.append(z)
        return torch.cat(out, dim=1)


def weighted_sum(stacked: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Σ_k w_k x_k / Σ_k w_k over dim 1 of (1, K, L, D) → (1, L, D)."""
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w / w.sum()
    return (stacked * w[:, None, None]).sum(dim=1)


def pad_with_empty(conds: list[torch.Tensor], empty: torch.Tensor) -> list[torch.Tensor]:
    """Pad each (B, L, D) to the longest L by appending chunks of `empty` (1, 77, D)."""
    longest = max(c.shape[1] for c in conds)
    out = []
    for c in conds:
        if (longest - c.shape[1]) % empty.shape[1]:
            raise ValueError(f"conditioning lengths must be multiples of {empty.shape[1]}; got {c.shape[1]}")
        repeats = (longest - c.shape[1]) // empty.shape[1]
        out.append(torch.cat([c, empty.expand(c.shape[0], -1, -1).repeat(1, repeats, 1)], dim=1) if repeats else c)
    return out


# -- both ----------------------------------------------------------------------------------------

def encode_weighted(tokenizer, text_encoder, texts: list[str], syntax: str) -> torch.Tensor:
    """B prompts in `syntax` ("compel" or "a1111") → (B, L, D), the shorter ones padded with
    empty-prompt chunks to the longest."""
    if check_syntax(syntax) is None:
        raise ValueError("encode_weighted needs a syntax, 'compel' or 'a1111'")
    if syntax == "compel":
        enc = CompelEncoder(tokenizer, text_encoder)
        conds, empty = [enc(t) for t in texts], enc.empty
    else:
        conds = [encode_a1111(tokenizer, text_encoder, t) for t in texts]
        empty = encode_a1111(tokenizer, text_encoder, "")
    return torch.cat(pad_with_empty(conds, empty))
