"""sdlearn's CLIP tokenizer against transformers' CLIPTokenizer, as diffusers uses it.

The reference is built from vocab.json / merges.txt that this file writes from the bundled
OpenAI merges file with its own, independent reading of it (OpenAI's recipe, spelled out below),
so a wrong vocabulary order in sdlearn cannot hide behind a shared helper.
"""
from __future__ import annotations

import gzip
import json
import random
import unicodedata
import warnings

import pytest
import torch

from reference import cache_dir
from sdlearn.tokenizer import BUNDLED_VOCAB, CLIPTokenizer, default_tokenizer

transformers = pytest.importorskip("transformers")

ASTRONAUT = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]   # transformers CLIPTokenizer


def _openai_vocabulary() -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt contents, following OpenAI's clip/simple_tokenizer.py."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    merges = gzip.open(BUNDLED_VOCAB).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = symbols + [v + "</w>" for v in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {v: i for i, v in enumerate(vocab)}, merges


@pytest.fixture(scope="module")
def folder():
    path = cache_dir("tokenizer")
    if not (path / "merges.txt").is_file():
        vocab, merges = _openai_vocabulary()
        (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def hf_ids(hf, texts) -> torch.Tensor:
    return hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# -- a corpus of awkward prompts ----------------------------------------------------------------

PUNCTUATION = list("!?.,;:'\"-()[]{}<>/\\|@#$%^&*_+=~`") + ["...", "?!", "--", "''", "\"'", ".,;", "!!!"]
CONTRACTIONS = ["don't", "it's", "we're", "they've", "i'm", "you'll", "he'd", "IT'S", "Can'T", "'s", "o'clock",
                "rock'n'roll", "''s", "’s"]
NUMBERS = ["3.14", "1,000", "2024", "0.5x", "4k", "8K", "v1.5", "1920s", "50%", "12:30", "-7", "1e-5"]
ACCENTED = ["café", "naïve", "résumé", "Ångström", "crème brûlée", "e\u0301", "Cafe\u0301", "ﬁne", "ΟΔΟΣ",
            "Σίσυφος", "Москва", "猫", "東京の夜", "مرحبا", "नमस्ते", "İstanbul", "straße", "ǅ", "Ǆemal",
            "ＦＵＬＬ", "Ã©", "&amp;", "&lt;3", "ß", "ﬀ", "Ⅻ", "½", "²", "٣", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
EMOJI = ["🐱", "👩‍🚀", "🇫🇷", "👍🏽", "❤️", "🔥🔥", "🙂", "✨", "🏳️‍🌈", "☕"]
SPACES = [" ", "  ", "\t", "\n", " \n\t ", "\u00a0", "\u3000", "\r\n", "\u2009", "\u200b", "\x1c", "   "]
SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "<|>"]


def _vocabulary_words(tok: CLIPTokenizer) -> list[str]:
    words = []
    for symbol in list(tok.encoder)[512:49406]:
        if symbol.endswith("</w>"):
            text = tok.decode([tok.encoder[symbol]])
            if text and "\ufffd" not in text:
                words.append(text)
    return words


def _case(rng: random.Random, word: str) -> str:
    pick = rng.random()
    if pick < 0.7:
        return word
    if pick < 0.8:
        return word.upper()
    if pick < 0.9:
        return word.title()
    return "".join(c.upper() if rng.random() < 0.5 else c for c in word)


def make_corpus(tok: CLIPTokenizer, n: int = 2400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = _vocabulary_words(tok)
    letters = "abcdefghijklmnopqrstuvwxyzéèàüöñç"
    kinds = [
        lambda: _case(rng, rng.choice(words)),
        lambda: _case(rng, "".join(rng.choice(letters) for _ in range(rng.randint(1, 14)))),
        lambda: rng.choice(PUNCTUATION) * rng.randint(1, 3),
        lambda: _case(rng, rng.choice(CONTRACTIONS)),
        lambda: rng.choice(NUMBERS),
        lambda: str(rng.randint(0, 10**6)) + rng.choice(["", ".", "." + str(rng.randint(0, 99))]),
        lambda: _case(rng, rng.choice(ACCENTED)),
        lambda: rng.choice(EMOJI),
        lambda: rng.choice(SPECIALS),
    ]
    weights = [40, 12, 10, 6, 5, 4, 10, 6, 1]
    corpus = ["", " ", "\n\t", "a photograph of an astronaut riding a horse", "cat,"]
    while len(corpus) < n:
        length = rng.choice([1, 2, 5, 10, 20]) if rng.random() < 0.9 else rng.randint(60, 120)
        parts = []
        for _ in range(length):
            parts.append(rng.choices(kinds, weights)[0]())
            parts.append(rng.choice(SPACES) if rng.random() < 0.3 else (" " if rng.random() < 0.85 else ""))
        corpus.append("".join(parts))
    return corpus


@pytest.fixture(scope="module")
def corpus(tok):
    return make_corpus(tok)


# -- the vocabulary -----------------------------------------------------------------------------

def test_bundled_vocabulary_is_openais_with_49408_ids_and_48894_merges(tok):
    vocab, merges = _openai_vocabulary()
    assert tok.vocab_size == 49408 and len(tok.bpe_ranks) == 48894
    assert tok.encoder == vocab
    assert [a + " " + b for (a, b), _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])] == merges
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)


def test_from_folder_reads_a_diffusers_tokenizer_folder(folder, tmp_path):
    (tmp_path / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / name).write_bytes((folder / name).read_bytes())
    loaded = CLIPTokenizer.from_folder(tmp_path)
    assert loaded.encoder == default_tokenizer().encoder
    assert loaded.bpe_ranks == default_tokenizer().bpe_ranks
    assert loaded.encode("a photograph of an astronaut riding a horse") == ASTRONAUT
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    assert CLIPTokenizer.from_folder(tmp_path).pad_token_id == 0     # SD 2.x style padding
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path / "tokenizer" / "nothing")


# -- parity with transformers -------------------------------------------------------------------

def test_corpus_has_every_kind_of_awkward_input(corpus, tok):
    assert len(corpus) >= 2000
    joined = "".join(corpus)
    for needle in ("\t", "\n", "  ", "'s", "3.14", "é", "🐱", "<|endoftext|>", "ＦＵＬＬ", "&amp;", "ΟΔΟΣ"):
        assert needle in joined, needle
    assert "" in corpus
    assert sum(len(tok.encode(t)) > 77 for t in corpus) >= 50
    assert sum(t != t.lower() for t in corpus) >= 200


def test_ids_equal_transformers_on_generated_corpus(corpus, tok, hf):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = tok(corpus)
    ref = hf_ids(hf, corpus)
    assert ours.dtype == torch.long and ours.shape == ref.shape == (len(corpus), 77)
    bad = [(t, ours[i].tolist(), ref[i].tolist()) for i, t in enumerate(corpus) if not torch.equal(ours[i], ref[i])]
    assert not bad, f"{len(bad)} prompts differ; first: {bad[0]}"


def test_pieces_equal_transformers_tokenize(corpus, tok, hf):
    for text in corpus[:300]:
        if "<|" not in text:
            assert tok.tokenize(text) == hf.tokenize(text), text


def test_reference_ids_from_gotchas(tok):
    ids = tok("a photograph of an astronaut riding a horse")
    assert ids.shape == (1, 77)
    assert ids[0].tolist() == ASTRONAUT + [49407] * 67


def test_comma_is_split_from_the_word_it_follows(tok):
    assert tok.encode("cat,") == [49406, 2368, tok.encoder[",</w>"], 49407]
    assert tok.encoder["cat</w>"] == 2368 and tok.encoder["cat"] == 1481   # the naive split's id
    assert tok.tokenize("cat,") == ["cat</w>", ",</w>"]


def test_empty_prompt_is_start_then_76_end_tokens(tok, hf):
    assert tok("")[0].tolist() == [49406] + [49407] * 76
    assert torch.equal(tok(["", "  \n"]), hf_ids(hf, ["", "  \n"]))


def test_tokenizer_pads_with_end_token_not_zero(tok):
    ids = tok(["a cat", "a photograph of an astronaut riding a horse"])
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == [49406, 320, 2368, 49407] + [49407] * 73
    assert (ids != 0).all()


def test_truncation_keeps_end_token_and_warns_naming_dropped_words(tok, hf):
    prompt = " ".join(["red"] * 74 + ["large", "fluffy", "zebra", "giraffe"])
    with pytest.warns(UserWarning, match="fluffy zebra giraffe") as record:
        ids = tok(prompt)
    assert "large" not in str(record[0].message) and "red" not in str(record[0].message)
    assert record[0].filename == __file__            # points at the caller, not the tokenizer
    assert ids[0].tolist() == [49406] + [tok.encoder["red</w>"]] * 74 + [tok.encoder["large</w>"], 49407]
    assert torch.equal(ids, hf_ids(hf, prompt))
    with pytest.warns(UserWarning, match="giraffe"):
        assert len(tok.encode(prompt, max_length=77)) == 77
    assert len(tok.encode(prompt)) == 80                  # no max_length: nothing is cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(" ".join(["red"] * 75))                       # exactly 77 ids: no warning


def test_special_literals_become_special_ids_only_when_written_exactly(tok):
    assert tok.encode("a <|endoftext|> b") == [49406, 320, 49407, 321, 49407]
    assert tok.encode("<|startoftext|>hi") == [49406, 49406, 1883, 49407]
    assert 49407 not in tok.encode("<|ENDOFTEXT|>")[1:-1]


def test_normalisation_follows_transformers_not_openai_ftfy(tok, hf):
    # OpenAI's tokenizer would unescape &amp; and fold full-width letters; transformers does not.
    for text in ("fish &amp; chips", "ＦＵＬＬ moon", "ΟΔΟΣ", "Cafe\u0301", "tab\tand\n\nnewline"):
        assert tok.encode(text) == hf(text).input_ids, text
    assert tok.tokenize("&amp;") == ["&</w>", "amp</w>", ";</w>"]
    assert tok.encode("café") == tok.encode("Cafe\u0301")                       # NFC
    assert tok.decode(tok.encode("ΟΔΟΣ")) == "οδοσ"                             # no final ς


def test_decode_round_trips_and_matches_transformers(corpus, tok, hf):
    for text in corpus[:600]:
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        # (decode strips the ends with str.strip, as transformers does, which also eats \x1c)
        if "<|" not in text and "\x1c" not in text and len(ids) <= 77:
            assert tok.encode(tok.decode(ids)) == ids, text
    batch = tok(["a red circle", "cat,"])
    assert tok.decode(batch) == ["a red circle", "cat ,"]
    assert unicodedata.is_normalized("NFC", tok.decode(tok.encode("e\u0301")))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([320, 49408])


def test_bpe_steps_apply_merges_in_rank_order(tok, hf):
    for word in ("astronaut", "circle", "zzzzqx", "photographically", "naïve"):
        steps = tok.bpe_steps(word)
        assert "".join(steps[0]) == "".join(steps[-1]) and steps[0][-1].endswith("</w>")
        assert steps[-1] == hf.tokenize(word)
        ranks = []
        for before, after in zip(steps, steps[1:]):
            assert len(after) < len(before)
            merged = {(a, b) for a, b in zip(before, before[1:]) if a + b in after}
            ranks.append(min(tok.bpe_ranks[p] for p in merged if p in tok.bpe_ranks))
        assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    assert tok.bpe_steps("cat") == [["c", "a", "t</w>"], ["c", "at</w>"], ["cat</w>"]]


def test_wrong_input_types_raise_type_error_saying_what_was_expected(tok):
    for bad in (123, None, b"bytes", {"a": 1}):
        with pytest.raises(TypeError, match="string"):
            tok(bad)
    with pytest.raises(TypeError, match="item 1"):
        tok(["fine", 3])
    with pytest.raises(TypeError, match="string"):
        tok.encode(["a list"])
    assert tok([]).shape == (0, 77)


def test_vocabulary_and_merges_that_do_not_belong_together_are_refused():
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "ab": 4}
    assert CLIPTokenizer(vocab, [("a", "b")]).bpe_ranks == {("a", "b"): 0}
    with pytest.raises(ValueError, match=r"1 merge results are not in the vocabulary \(first: 'ba'\)"):
        CLIPTokenizer(vocab, [("a", "b"), ("b", "a")])
    with pytest.raises(ValueError, match="lacks the end token"):
        CLIPTokenizer({"<|startoftext|>": 0, "a": 1}, [])


def test_tokenizer_json_of_transformers_5_gives_the_same_ids(tmp_path):
    """transformers 5 saves only tokenizer.json; a folder holding it loads to the same tokenizer."""
    from transformers import CLIPTokenizer as HFTokenizer

    from checkpoints import write_tokenizer_files
    vocab, merges = write_tokenizer_files(tmp_path / "slow")
    HFTokenizer(str(vocab), str(merges)).save_pretrained(tmp_path / "fast")
    assert not (tmp_path / "fast" / "merges.txt").exists()
    ours = CLIPTokenizer.from_folder(tmp_path / "fast")
    text = ["a photograph of an astronaut riding a horse", "cat, dog's 3.14 — Ünïcode 🐈"]
    assert torch.equal(ours(text), CLIPTokenizer.bundled()(text))


# -- added tokens (textual inversion; tests/test_textual_inversion.py checks them against transformers) --

def test_added_tokens_are_numbered_after_the_vocabulary_and_cut_out_before_the_bpe(tok):
    added = tok.with_added_tokens(["<cat-toy>", "qqtok"])
    assert added.vocab_size == 49410 and added.added_tokens == {"<cat-toy>": 49408, "qqtok": 49409}
    assert added.encode("a <Cat-Toy> qqtok") == [49406, 320, 49408, 49409, 49407]
    assert added.encode("a<cat-toy>s") == [49406, tok.encoder["a</w>"], 49408, tok.encoder["s</w>"], 49407]
    assert len(tok.encode("a <cat-toy>")) > 4 and not tok.added_tokens      # the original is unchanged
    renumbered = added.without_added_tokens(["<cat-toy>"])
    assert renumbered.added_tokens == {"qqtok": 49408} and renumbered.encode("qqtok") == [49406, 49408, 49407]
    assert added.without_added_tokens().encode("a <cat-toy>") == tok.encode("a <cat-toy>")


def test_added_tokens_that_are_not_strings_words_or_added_are_refused(tok):
    for bad in (3, None, "", "  "):
        with pytest.raises(ValueError, match="non-empty string"):
            tok.with_added_tokens([bad])
    with pytest.raises(ValueError, match=r"it is the word 'cat' \(id 2368\)"):
        tok.with_added_tokens(["Cat"])
    with pytest.raises(ValueError, match=r"not added tokens: \['<dog>'\]"):
        tok.with_added_tokens(["<cat-toy>"]).without_added_tokens(["<dog>"])
