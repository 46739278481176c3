"""Notebook 02's exercises (sdlearn/exercises/nb02_clip.py): the references are the package's
tokenizer and attention, a learner's answer written as the notebook's solution passes, and the
inputs catch the mistakes they are there for."""
from __future__ import annotations

import copy
import math
import warnings

import torch

from sdlearn import exercises
from sdlearn.exercises import EXERCISES
from sdlearn.tokenizer import default_tokenizer


def my_bpe(word, ranks):
    symbols = list(word)
    symbols[-1] += "</w>"
    while True:
        ranked = [p for p in zip(symbols, symbols[1:]) if p in ranks]
        if not ranked:
            return symbols
        best = min(ranked, key=ranks.get)
        i = 0
        while i < len(symbols) - 1:          # in place: a merged symbol is not looked at again
            if (symbols[i], symbols[i + 1]) == best:
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            i += 1


def test_a_learners_pieces_pass():
    mask = lambda n: torch.arange(n)[None, :] <= torch.arange(n)[:, None]

    def head(q, k, v):
        s = (q @ k.T / math.sqrt(q.shape[-1])).masked_fill(~mask(q.shape[0]), -math.inf)
        return s.softmax(-1) @ v
    def pad_ids(token_ids, length=77):
        row = [49406] + token_ids[:length - 2] + [49407]
        return row + [49407] * (length - len(row))
    mine = {"bpe": my_bpe, "pad_ids": pad_ids, "causal_mask": mask, "attention_head": head,
            "quick_gelu": lambda x: x / (1 + torch.exp(-1.702 * x))}
    for name, fn in mine.items():
        report = exercises.run_check(name, fn)
        assert report.passed, report.message


def test_bpe_reference_is_the_tokenizers_own_loop():
    tok = default_tokenizer()
    for word in ["photograph", "stablediffusion", "aaaa", "zzzqx", "a"]:
        assert EXERCISES["bpe"].reference(word, tok.bpe_ranks) == tok.bpe_steps(word)[-1]


def test_the_made_up_ranks_catch_merging_the_leftmost_pair():
    ex = EXERCISES["bpe"]
    leftmost = ex.mistakes[0].wrong
    case = next(c for c in ex.cases() if c.args[0] == "abcd")
    assert leftmost(*case.args) != ex.reference(*case.args)


def test_the_rank_table_is_not_copied_for_every_call():
    ranks = next(c for c in EXERCISES["bpe"].cases() if c.args[0] == "photograph").args[1]
    assert copy.deepcopy(ranks) is ranks and len(ranks) == 48894


def test_causal_mask_reference_keeps_the_diagonal_and_below():
    for n in (1, 5, 77):
        assert torch.equal(EXERCISES["causal_mask"].reference(n), torch.ones(n, n, dtype=torch.bool).tril())


def test_attention_head_reference_lets_the_first_token_see_only_itself():
    q, k, v = torch.randn(3, 6, 4).unbind(0)
    out = EXERCISES["attention_head"].reference(q, k, v)
    assert out.shape == (6, 4) and torch.allclose(out[0], v[0], atol=1e-6)


def test_pad_ids_reference_is_the_tokenizers_own_row():
    """On real prompts (empty, short, exactly 75 ids, one too many, far too many) the reference,
    given the prompt's ids without start and end, makes the row the tokenizer makes."""
    tok = default_tokenizer()
    pad = EXERCISES["pad_ids"].reference
    prompts = ["", "a red circle", "a b " * 37 + "c", "a b " * 38, ", ".join(["a large red circle"] * 30)]
    for prompt in prompts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = tok(prompt)[0].tolist()
        ids = tok.encode(prompt)[1:-1]
        assert pad(ids) == row and len(row) == 77, prompt
    assert [len(tok.encode(p)) - 2 for p in prompts[2:4]] == [75, 76]
    long = tok.encode(prompts[-1])[1:-1]                 # another length: the tokenizer's own cut to 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pad(long, 8) == tok.encode(prompts[-1], max_length=8)


def test_only_a_prompt_too_long_tells_where_the_cut_is_made():
    """Cutting the finished row instead of the ids, or keeping one id too many, gives the right row
    for every prompt that fits: only the cases with 76 ids or more catch them."""
    ex = EXERCISES["pad_ids"]
    too_long = {"76 random ids (one too many), length 77", "100 random ids, length 77", "10 random ids, length 8"}
    assert too_long <= {c.label for c in ex.cases()}
    cut = [m for m in ex.mistakes if "lost its end token" in m.hint or "one id too long" in m.hint]
    assert len(cut) == 2
    for mistake in cut:
        wrong = {c.label for c in ex.cases() if mistake.wrong(*c.args) != ex.reference(*c.args)}
        assert wrong and wrong <= too_long, wrong
