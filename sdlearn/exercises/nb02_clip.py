"""Notebook 02 (CLIP): the BPE merge loop for one word, a prompt's ids padded to 77, the causal
mask, one causal attention head, quick_gelu."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .. import attention as attention_module
from .. import clip
from .. import tokenizer as tokenization
from .core import Case, Exercise, Mistake, difference, register

# ------------------------------------------------------------------------------------ bpe
# (word, ranks) → the word's final BPE symbols. ASCII words: each letter is its own byte symbol.


def _package_bpe(word, ranks):
    """The package's CLIPTokenizer.bpe_steps with the given rank table (its last step)."""
    state = SimpleNamespace(_byte_encoder=tokenization.bytes_to_unicode(), bpe_ranks=ranks)
    return tokenization.CLIPTokenizer.bpe_steps(state, word)[-1]


class _Ranks(dict):
    """A rank table whose deep copy is itself: check() deep-copies every input, and copying
    SD's 48,894 merges for every call would only cost time (nobody's function changes it)."""

    def __deepcopy__(self, memo):
        return self


def _bpe_cases() -> list[Case]:
    real = _Ranks(tokenization.default_tokenizer().bpe_ranks)
    # Made-up ranks where the leftmost pair is not the best one: b+c (rank 0) before a+b (rank 1).
    made_up = _Ranks({("b", "c"): 0, ("a", "b"): 1, ("bc", "d</w>"): 2, ("a", "bcd</w>"): 3})
    return [Case("word 'photograph' with CLIP's ranks", ("photograph", real)),
            Case("word 'triangle' with CLIP's ranks", ("triangle", real)),
            Case("word 'abcd' with ranks {('b','c'): 0, ('a','b'): 1, ('bc','d</w>'): 2, ('a','bcd</w>'): 3}",
                 ("abcd", made_up)),
            Case("word 'stablediffusion' with CLIP's ranks", ("stablediffusion", real)),
            Case("word 'aaaa' with ranks {('a','a'): 0} (a pair that occurs twice)",
                 ("aaaa", _Ranks({("a", "a"): 0}))),
            Case("word 'a' (one letter) with CLIP's ranks", ("a", real)),
            Case("word 'zzzqx' with no ranks at all ({})", ("zzzqx", _Ranks()))]


def _loop(symbols, ranks, choose):
    """The merge loop of the wrong versions: `choose` picks the pair to merge among the ranked ones."""
    while True:
        ranked = [p for p in zip(symbols, symbols[1:]) if p in ranks]
        if not ranked:
            return symbols
        symbols = tokenization.merge_pair(symbols, choose(ranked, ranks))


def _lowest(ranked, ranks):
    return min(ranked, key=ranks.get)


def _leftmost_pair(word, ranks):            # merges the first ranked pair, not the best-ranked one
    symbols = list(word)
    symbols[-1] += "</w>"
    return _loop(symbols, ranks, lambda ranked, r: ranked[0])


def _no_word_end(word, ranks):
    return _loop(list(word), ranks, _lowest)


def _word_end_apart(word, ranks):           # "</w>" as a symbol of its own
    return _loop(list(word) + ["</w>"], ranks, _lowest)


def _highest_rank(word, ranks):
    symbols = list(word)
    symbols[-1] += "</w>"
    return _loop(symbols, ranks, lambda ranked, r: max(ranked, key=r.get))


register(Exercise(
    name="bpe", notebook="02_clip",
    reference=_package_bpe,
    cases=_bpe_cases,
    mistakes=[Mistake("each step merges the adjacent pair with the LOWEST rank anywhere in the word, not the "
                      "first ranked pair from the left.", _leftmost_pair),
              Mistake("a low rank means learned early, so it goes first: take min over the ranks, not max.",
                      _highest_rank),
              Mistake("the word end marker '</w>' is glued to the last symbol before merging (\"d\" → \"d</w>\"); "
                      "the ranks know 'h</w>', not 'h'.", _no_word_end),
              Mistake("'</w>' is not a symbol of its own: append it to the last letter (\"d</w>\").",
                      _word_end_apart)],
    hint="follow the word 'abcd' with the made-up ranks by hand: after each merge, which adjacent "
         "pairs have a rank, which one did you merge, and did you stop too early or too late?"))


# -------------------------------------------------------------------------------- pad_ids
# (a prompt's ids without start and end, length) → the row of `length` ids the tokenizer makes.

START, END = 49406, 49407                   # SD v1's start and end tokens; the end token also pads


def _pad_cases() -> list[Case]:
    red = tokenization.default_tokenizer().encode("a red circle")[1:-1]
    g = torch.Generator().manual_seed(4)

    def ids(n):
        return torch.randint(0, START, (n,), generator=g).tolist()
    return [Case(f"the ids of 'a red circle', {red}, length 77", (red, 77)),
            Case("20 random ids, length 77", (ids(20), 77)),
            Case("no ids (the empty prompt), length 77", ([], 77)),
            Case("75 random ids (exactly what fits), length 77", (ids(75), 77)),
            Case("76 random ids (one too many), length 77", (ids(76), 77)),
            Case("100 random ids, length 77", (ids(100), 77)),
            Case("10 random ids, length 8", (ids(10), 8))]


def _same_row(got, expected) -> str | None:
    """A row is a list of ints; a 1-D integer tensor (or a tuple) is compared as its list."""
    if isinstance(got, torch.Tensor) and got.dim() == 1 and not got.dtype.is_floating_point:
        got = got.tolist()
    return difference(got, expected, 0, 0)


def _row(ids, length, *, keep, start=True, pad=END):
    row = ([START] if start else []) + list(ids)[:keep] + [END]
    return row + [pad] * (length - len(row))


def _padded_row(token_ids, length=77):
    """The row `CLIPTokenizer.__call__` makes from a prompt whose ids, without start and end, are
    `token_ids`: start, the first length − 2 ids, end, then the end token as padding
    (tests/test_exercises_nb02.py checks it against the tokenizer on real prompts)."""
    return _row(token_ids, length, keep=length - 2)


def _cut_the_finished_row(ids, length):     # the end token appended, then everything cut to length
    return ([START] + list(ids) + [END] + [END] * length)[:length]


register(Exercise(
    name="pad_ids", notebook="02_clip",
    reference=_padded_row,
    cases=_pad_cases,
    compare=_same_row,
    mistakes=[Mistake("padding should be 49407: SD v1's tokenizer pads with the end token, not with 0 "
                      "(section 6).", lambda ids, n: _row(ids, n, keep=n - 2, pad=0)),
              Mistake("a prompt that is too long lost its end token: cut the ids, not the finished row, so "
                      "that the end token always fits.", _cut_the_finished_row),
              Mistake("with a long prompt your row is one id too long: the start and the end token both "
                      "need a place among the `length`.", lambda ids, n: _row(ids, n, keep=n - 1)),
              Mistake("the row starts with the start token 49406 (section 5).",
                      lambda ids, n: _row(ids, n, keep=n - 1, start=False))],
    hint="compare your row with section 6's: what comes first, what follows the last id, what fills the "
         "rest, and how many ids fit when the prompt is too long?"))


# ---------------------------------------------------------------------------- causal_mask

def _package_mask(n):
    """Where the package's causal attention gives a query any weight: with all scores equal
    (q = k = 0) every allowed key gets 1/(i+1), every masked one exactly 0."""
    zeros = torch.zeros(1, 1, n, 1)
    return attention_module.attention_probs(zeros, zeros, causal=True)[0, 0] > 0


def _mask_cases() -> list[Case]:
    return [Case("n = 4", (4,)), Case("n = 77", (77,)), Case("n = 1", (1,))]


register(Exercise(
    name="causal_mask", notebook="02_clip",
    reference=_package_mask,
    cases=_mask_cases,
    mistakes=[Mistake("a token also attends to itself: the diagonal (j = i) is allowed, so keep it True.",
                      lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1)),
              Mistake("rows are queries and columns keys: your mask lets each token see the tokens after it "
                      "(the future) instead of those before it.",
                      lambda n: torch.ones(n, n, dtype=torch.bool).triu()),
              Mistake("the mask says where attention is ALLOWED (True), as the package's masked_fill(~mask, −∞) "
                      "reads it; yours is True where it is blocked.",
                      lambda n: torch.ones(n, n, dtype=torch.bool).triu(1)),
              Mistake("the mask should hold booleans (dtype torch.bool), True where "
                      "row i may attend to column j; yours holds numbers.",
                      lambda n: torch.ones(n, n).tril())],
    hint="row i is query i and column j key j: which keys may token i see, and does that include itself?"))


# ---------------------------------------------------------------------- attention_head

def _package_head(q, k, v):
    """The package's attention with one head and the causal mask: (N, d) each → (N, d)."""
    return attention_module.attention(q[None], k[None], v[None], heads=1, causal=True)[0]


def _head_cases() -> list[Case]:
    g = torch.Generator().manual_seed(2)
    def qkv(n, d, scale=1.0):
        return tuple(torch.randn(n, d, generator=g) * scale for _ in range(3))
    return [Case("q, k, v of shape (5, 8), standard normal", qkv(5, 8)),
            Case("q, k, v of shape (77, 64), standard normal × 2", qkv(77, 64, 2.0)),
            Case("q, k, v of shape (1, 16) (one token)", qkv(1, 16))]


def _scores_to_out(q, k, v, scores, mask_value=float("-inf"), dim=-1):
    n = q.shape[0]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~allowed, mask_value).softmax(dim=dim) @ v


register(Exercise(
    name="attention_head", notebook="02_clip",
    reference=_package_head,
    cases=_head_cases,
    mistakes=[Mistake("did you divide the scores by √d (d = the head's width, q.shape[-1])?",
                      lambda q, k, v: _scores_to_out(q, k, v, q @ k.T)),
              Mistake("the scores are divided by √d, not by d.",
                      lambda q, k, v: _scores_to_out(q, k, v, q @ k.T / q.shape[-1])),
              Mistake("the causal mask is missing: query i must not see keys j > i (set those scores to −∞ "
                      "before the softmax).",
                      lambda q, k, v: (q @ k.T / math.sqrt(q.shape[-1])).softmax(-1) @ v),
              Mistake("masked scores must be −∞, not 0: e⁰ = 1 still gives the future keys weight.",
                      lambda q, k, v: _scores_to_out(q, k, v, q @ k.T / math.sqrt(q.shape[-1]), mask_value=0.0)),
              Mistake("the softmax runs over the keys (the last dimension), so each query's weights sum to 1.",
                      lambda q, k, v: _scores_to_out(q, k, v, q @ k.T / math.sqrt(q.shape[-1]), dim=0))],
    hint="follow the shapes: the scores are (N, N), queries × keys, scaled as in section 9; which "
         "of them must not count, and along which axis does each query's softmax run?",
    atol=1e-5, rtol=1e-4))


# ------------------------------------------------------------------------------ quick_gelu

def _gelu_cases() -> list[Case]:
    g = torch.Generator().manual_seed(3)
    return [Case("x = linspace(−6, 6, 121)", (torch.linspace(-6, 6, 121),)),
            Case("x of shape (2, 77, 8), standard normal × 3", (torch.randn(2, 77, 8, generator=g) * 3,)),
            Case("x = [0.]", (torch.zeros(1),))]


register(Exercise(
    name="quick_gelu", notebook="02_clip",
    reference=lambda x: clip.quick_gelu(x),
    cases=_gelu_cases,
    mistakes=[Mistake("that is the exact GELU x·Φ(x); CLIP was trained with "
                      "quick_gelu, section 8's sigmoid approximation.",
                      lambda x: F.gelu(x)),
              Mistake("that is GELU's tanh approximation; CLIP's activation is "
                      "quick_gelu, which uses a sigmoid (section 8).",
                      lambda x: F.gelu(x, approximate="tanh")),
              Mistake("your curve is a smooth step from 0 to 1; quick_gelu grows "
                      "like x for large x: the factor in front is missing.",
                      lambda x: torch.sigmoid(1.702 * x)),
              Mistake("that is SiLU, x·σ(x): look at what section 8 puts inside the sigmoid.",
                      lambda x: x * torch.sigmoid(x))],
    hint="look at section 8's formula again: what goes inside the sigmoid, and what multiplies it?"))
