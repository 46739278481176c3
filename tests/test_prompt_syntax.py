"""Prompt weighting and long prompts: the web UI's syntax against its own examples and a
transcription of its chunking and emphasis, compel's against the compel library itself."""
from __future__ import annotations

import math

import pytest
import torch

from reference import cache_dir, rel_err
from checkpoints import write_tokenizer_files
from test_clip import reference_model, transformers_state_dict
from sdlearn.clip import CLIPTextModel
from sdlearn.configs import CLIPTextConfig
from sdlearn.prompt_syntax import Blend, check_syntax, parse_a1111, parse_compel
from sdlearn.tokenizer import default_tokenizer
from sdlearn.weighted_text import (CompelEncoder, a1111_chunks, compel_split, emphasis, encode_a1111,
                                   encode_weighted, pad_with_empty)

transformers = pytest.importorskip("transformers")

LONG = ", ".join(["a red circle on the left"] * 14) + ". a (blue square)0.6 at the top, " + " ".join(["green++ triangle"] * 12)


# -- the web UI's parser ----------------------------------------------------------------------------

# The doctests of parse_prompt_attention, modules/prompt_parser.py of
# github.com/AUTOMATIC1111/stable-diffusion-webui (commit 28bd8e1), then cases of our own.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # ours
    ("", [("", 1.0)]),
    ("a [red] circle", [("a ", 1.0), ("red", 1 / 1.1), (" circle", 1.0)]),
    ("a [[red]] circle", [("a ", 1.0), ("red", 1 / 1.1 / 1.1), (" circle", 1.0)]),
    ("a (red: 0.5 ) circle", [("a ", 1.0), ("red", 0.5), (" circle", 1.0)]),
    ("a (red:-1) circle", [("a ", 1.0), ("red", -1.0), (" circle", 1.0)]),
    ("(a (red:1.5) circle:0.5)", [("a ", 0.5), ("red", 0.75), (" circle", 0.5)]),
    ("a red circle) on [the left", [("a red circle) on ", 1.0), ("the left", 1 / 1.1)]),
    ("a \\\\ b \\[c\\]", [("a \\ b [c]", 1.0)]),
    ("a red circle BREAK a blue square", [("a red circle", 1.0), ("BREAK", -1.0), ("a blue square", 1.0)]),
    ("cat:1.3 dog", [("cat:1.3 dog", 1.0)]),
    ("(red:1.2)(blue:1.2)", [("redblue", 1.2)]),
]


@pytest.mark.parametrize("text, want", A1111_EXAMPLES)
def test_a1111_parser_matches_the_web_ui_examples(text, want):
    got = parse_a1111(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


def test_bad_syntax_names_are_refused_with_the_choices():
    assert check_syntax(None) is None and check_syntax("a1111") == "a1111"
    with pytest.raises(ValueError, match="'compel'.*'a1111'"):
        check_syntax("A1111")


# -- the web UI's chunking and emphasis, transcribed ------------------------------------------------

def webui_tokenize_line(hf_tokenizer, line: str, comma_padding_backtrack: int = 20):
    """FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line (modules/sd_hijack_clip.py), as written
    there, without textual-inversion embeddings; the tokenizer is transformers'."""
    parsed = parse_a1111(line)
    tokenized = hf_tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    id_start, id_end, comma_token, chunk_length = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, 267, 75
    chunks, chunk, last_comma = [], {"tokens": [], "multipliers": []}, -1

    def next_chunk():
        nonlocal chunk, last_comma
        to_add = chunk_length - len(chunk["tokens"])
        if to_add > 0:
            chunk["tokens"] += [id_end] * to_add
            chunk["multipliers"] += [1.0] * to_add
        chunk["tokens"] = [id_start] + chunk["tokens"] + [id_end]
        chunk["multipliers"] = [1.0] + chunk["multipliers"] + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = {"tokens": [], "multipliers": []}

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_token:
                last_comma = len(chunk["tokens"])
            elif (comma_padding_backtrack != 0 and len(chunk["tokens"]) == chunk_length and last_comma != -1
                  and len(chunk["tokens"]) - last_comma <= comma_padding_backtrack):
                break_location = last_comma + 1
                reloc_tokens = chunk["tokens"][break_location:]
                reloc_mults = chunk["multipliers"][break_location:]
                chunk["tokens"] = chunk["tokens"][:break_location]
                chunk["multipliers"] = chunk["multipliers"][:break_location]
                next_chunk()
                chunk["tokens"] = reloc_tokens
                chunk["multipliers"] = reloc_mults
            if len(chunk["tokens"]) == chunk_length:
                next_chunk()
            chunk["tokens"].append(token)
            chunk["multipliers"].append(weight)
            position += 1
    if chunk["tokens"] or not chunks:
        next_chunk()
    return [(c["tokens"], c["multipliers"]) for c in chunks]


def webui_encode(hf_tokenizer, text_encoder, line: str) -> torch.Tensor:
    """forward → process_tokens → EmphasisOriginal.after_transformers (modules/sd_emphasis.py)."""
    zs = []
    for tokens, multipliers in webui_tokenize_line(hf_tokenizer, line):
        z = text_encoder(torch.asarray([tokens]))
        original_mean = z.mean()
        z = z * torch.asarray([multipliers]).reshape((1, -1, 1)).expand(z.shape)
        new_mean = z.mean()
        zs.append(z * (original_mean / new_mean))
    return torch.hstack(zs)


def comma_prompt(words_before: int, tail: str) -> str:
    return " ".join(["circle"] * words_before) + ", " + tail


A1111_CORPUS = [
    "a red circle", "", "a (red:1.3) circle on the left", "a [red] ((circle)) [[on the left]]",
    "a (red circle:0.5), (blue square:1.4)", "a red circle BREAK a blue square", "(a red circle BREAK on the left)",
    "\\(a\\) red circle", LONG, LONG.replace("(", "[").replace(")0.6", "]"),
    comma_prompt(60, " ".join(["square"] * 30)),          # comma at 60: the 15 ids after it move on
    comma_prompt(40, " ".join(["square"] * 40)),          # comma too far back: a plain cut at 75
    comma_prompt(74, "square square"),                    # the comma is the 75th id
    " ".join(["(red:1.2) circle,"] * 40), "BREAK", "a BREAK BREAK b",
    "word " * 200,
]


@pytest.fixture(scope="module")
def tiny_text():
    """A random tiny CLIP in transformers and the same weights in sdlearn, and the tokenizers."""
    cfg = CLIPTextConfig.tiny()
    ref = reference_model(cfg, seed=3)
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(transformers_state_dict(ref), strict=True)
    vocab, merges = write_tokenizer_files(cache_dir("tokenizer-files"))
    hf_tok = transformers.CLIPTokenizer(str(vocab), str(merges), model_max_length=77, pad_token="<|endoftext|>")
    return ref, ours, hf_tok


@pytest.mark.parametrize("text", A1111_CORPUS)
def test_a1111_chunks_match_the_web_ui_transcription(tiny_text, text):
    _, ours, hf_tok = tiny_text
    want = webui_tokenize_line(hf_tok, text)
    got = a1111_chunks(default_tokenizer(), parse_a1111(text))
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    assert [m for _, m in got] == [m for _, m in want]
    assert all(len(ids) == 77 for ids, _ in got)
    with torch.no_grad():
        assert rel_err(encode_a1111(default_tokenizer(), ours, text), webui_encode(hf_tok, ours, text)) <= 1e-6


def test_a1111_comma_backtrack_moves_the_words_after_the_comma():
    chunks = a1111_chunks(default_tokenizer(), parse_a1111(comma_prompt(60, " ".join(["square"] * 30))))
    first = chunks[0][0]
    assert first[61] == 267 and first[62:] == [49407] * 15       # ", " was the 61st id; then padding
    assert len(chunks) == 2 and chunks[1][0][1:31] == [default_tokenizer().encode("square")[1]] * 30


def test_a1111_weight_one_is_the_plain_encoding_and_the_mean_is_kept(tiny_text):
    _, ours, _ = tiny_text
    tok = default_tokenizer()
    with torch.no_grad():
        plain = ours(tok("a red circle on the left"))
        # z · 1 is z and mean(z) / mean(z) is 1 exactly (the same reduction of the same tensor twice):
        assert torch.equal(encode_a1111(tok, ours, "a red circle on the left"), plain)
        weighted = encode_a1111(tok, ours, "a (red:1.5) circle [on the left]")
    assert rel_err(weighted, plain) > 1e-2
    assert weighted.mean().item() == pytest.approx(ours(tok("a red circle on the left")).mean().item(), rel=1e-4)
    z = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(0)) + 0.3
    w = torch.rand(1, 77, generator=torch.Generator().manual_seed(1)) + 0.5
    out = emphasis(z, w)
    assert out.mean().item() == pytest.approx(z.mean().item(), rel=1e-5)
    assert rel_err(out, z * w[..., None] * (z.mean() / (z * w[..., None]).mean())) <= 1e-7


# -- compel's parser and conditioning, against compel ----------------------------------------------

COMPEL_CORPUS = [
    "a red circle", "", "a red+ circle", "a red++ circle on the left", "a red- circle",
    "a (red circle)1.3 on the left", "a (red circle)0.5", "a ((red)1.2 circle)0.8", "red+++ blue--- green",
    "a (red, blue)0.7 circle.", "a red circle,on the left", 'a "red circle"1.4', "(red).attend(1.2) circle",
    '("a red circle", "a blue square").blend(0.7, 0.3)', '("a red circle", "a blue square").blend(1, 1, no_normalize)',
    '("a red circle", "a blue square").and()', '("a red+ circle", "a (blue square)0.6").and(1, 0.5)',
    "a \\(literal\\) circle", "(red)0.0 circle", "foo(bar) baz", LONG, LONG + " (yellow)0.3", "(" + LONG + ")0.8",
]


def _compel_structure(conj):
    from compel.prompt_parser import Blend as CompelBlend
    parts = []
    for p in conj.prompts:
        if isinstance(p, CompelBlend):
            parts.append(("blend", [[(f.text, f.weight) for f in q.children] for q in p.prompts],
                          list(p.weights), p.normalize_weights))
        else:
            parts.append([(f.text, f.weight) for f in p.children])
    return parts, list(conj.weights)


def _our_structure(conj):
    parts = [("blend", [q.fragments for q in p.prompts], list(p.weights), p.normalize) if isinstance(p, Blend)
             else p.fragments for p in conj.parts]
    return parts, list(conj.weights)


@pytest.mark.parametrize("text", COMPEL_CORPUS)
def test_compel_parser_matches_compel(text):
    prompt_parser = pytest.importorskip("compel.prompt_parser")
    want = _compel_structure(prompt_parser.PromptParser().parse_conjunction(text))
    assert _our_structure(parse_compel(text)) == want


def test_compel_features_sdlearn_does_not_have_are_refused():
    for text in ("a cat.swap(dog)", "a cat withLora(x, 0.5)", '("a", "b").blend(0.5, 0.5) on the left'):
        with pytest.raises(ValueError):
            parse_compel(text)


def compel_reference(ref, hf_tok):
    compel = pytest.importorskip("compel")
    return compel.Compel(tokenizer=hf_tok, text_encoder=ref, truncate_long_prompts=False)


def test_compel_conditioning_matches_compel_at_tiny_size(tiny_text):
    ref, ours, hf_tok = tiny_text
    reference, encoder = compel_reference(ref, hf_tok), CompelEncoder(default_tokenizer(), ours)
    errors = {}
    with torch.no_grad():
        plain = reference("a red circle on the left")
        for text in COMPEL_CORPUS:
            want, got = reference(text), encoder(text)
            assert got.shape == want.shape, text
            errors[text] = rel_err(got, want)
        weighted = reference("a (red circle)0.5 on+ the left")
    assert max(errors.values()) <= 1e-5, errors
    assert rel_err(weighted, plain) > 1e-2          # the weights do change the conditioning
    assert reference(LONG).shape[1] == 154


@pytest.mark.full
def test_compel_conditioning_matches_compel_at_sd15_size():
    ref = reference_model(CLIPTextConfig.sd15(), seed=4)
    ours = CLIPTextModel(CLIPTextConfig.sd15()).eval()
    ours.load_state_dict(transformers_state_dict(ref), strict=True)
    vocab, merges = write_tokenizer_files(cache_dir("tokenizer-files"))
    hf_tok = transformers.CLIPTokenizer(str(vocab), str(merges), model_max_length=77, pad_token="<|endoftext|>")
    reference, encoder = compel_reference(ref, hf_tok), CompelEncoder(default_tokenizer(), ours)
    with torch.no_grad():
        worst = max(rel_err(encoder(t), reference(t)) for t in COMPEL_CORPUS)
    assert worst <= 1e-5


def test_compel_padding_matches_compel(tiny_text):
    ref, ours, hf_tok = tiny_text
    reference, encoder = compel_reference(ref, hf_tok), CompelEncoder(default_tokenizer(), ours)
    with torch.no_grad():
        want = reference.pad_conditioning_tensors_to_same_length([reference(LONG), reference("ugly")])
        got = pad_with_empty([encoder(LONG), encoder("ugly")], encoder.empty)
        assert rel_err(torch.cat(got), torch.cat(want)) <= 1e-5
        both = encode_weighted(default_tokenizer(), ours, ["ugly", LONG], "compel")
    assert both.shape == (2, 154, ours.config.hidden_size)
    assert rel_err(both, torch.cat(want[::-1])) <= 1e-5


def test_compel_pieces():
    tok = default_tokenizer()
    ids = tok.encode("a b c. " * 30)[1:-1]                    # 120 ids, a "." every 4th
    assert compel_split(tok, ids) == 72                       # after the last "." among the first 75
    assert compel_split(tok, ids[:75]) == 75


# -- the pipeline -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe():
    import sdlearn
    return sdlearn.load_pipeline("tiny")


def test_unet_reads_a_context_of_any_length(tiny_pipe):
    """Cross-attention over [c; c] (154 tokens) equals attention over c: the same keys twice
    leave softmax's weights halved and the values' sum the same."""
    pipe = tiny_pipe
    with torch.no_grad():
        c = pipe.encode_prompts(["a red circle on the left"])
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        short = pipe.unet(x, 500, c)
        long = pipe.unet(x, 500, torch.cat([c, c], dim=1))
    assert rel_err(long, short) <= 1e-5


def test_generate_takes_a_150_token_prompt_in_both_syntaxes(tiny_pipe):
    prompt = " ".join(["a red circle left,"] * 30)             # 150 ids, a comma every 5th
    assert len(default_tokenizer().encode(prompt)) - 2 == 150
    for syntax, n in (("compel", 154), ("a1111", 154)):
        with torch.no_grad():
            context = tiny_pipe.encode_prompts([prompt], [""], prompt_syntax=syntax)
        assert context.shape[:2] == (2, n)
        result = tiny_pipe.generate(prompt, steps=2, seed=0, progress=False, prompt_syntax=syntax,
                                    negative_prompt="a blue square")
        assert result.settings["prompt_syntax"] == syntax
        assert torch.isfinite(result.pixels).all()


def test_generate_default_syntax_is_plain_text_and_bad_values_are_refused(tiny_pipe):
    a = tiny_pipe.generate("a (red) circle", steps=2, seed=0, progress=False)
    assert a.settings["prompt_syntax"] is None
    with torch.no_grad():
        plain = tiny_pipe.text_encoder(tiny_pipe.tokenizer(["a (red) circle"]))
        assert torch.equal(tiny_pipe.encode_prompts(["a (red) circle"]), plain)
        compel_plain = tiny_pipe.encode_prompts(["a red circle"], prompt_syntax="compel")
        assert rel_err(compel_plain, tiny_pipe.encode_prompts(["a red circle"])) <= 1e-6
    with pytest.raises(ValueError, match="prompt_syntax"):
        tiny_pipe.generate("a red circle", steps=1, progress=False, prompt_syntax="webui")
    assert math.isfinite(a.pixels.sum().item())


def test_cli_passes_the_prompt_syntax_and_records_it(tmp_path, capsys):
    from PIL import Image
    from sdlearn.cli import main
    out = tmp_path / "w.png"
    code = main(["generate", "a (red:1.3) circle", "--prompt-syntax", "a1111", "--weights", "tiny", "--seed", "1",
                 "--steps", "2", "-q", "-o", str(out)])
    capsys.readouterr()
    assert code == 0
    with Image.open(out) as img:
        assert img.text["prompt_syntax"] == "a1111" and img.text["prompt"] == "a (red:1.3) circle"
    with pytest.raises(SystemExit):
        main(["generate", "x", "--prompt-syntax", "webui"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_tiny_models_vocabulary_check_reads_the_words_not_the_syntax():
    import warnings as _w
    import sdlearn
    from sdlearn.prompt_syntax import plain_text
    assert plain_text("a (red:1.3) circle BREAK [on the left]", "a1111").split() == "a red circle on the left".split()
    assert set(plain_text('("a red circle", "a blue square").blend(0.7, 0.3)', "compel").split()) == \
        {"a", "red", "circle", "blue", "square"}
    assert plain_text("a red++ circle", "compel").split() == ["a", "red", "circle"]
    pipe = sdlearn.load_pipeline("tiny")
    for text, syntax in [("a (red:1.3) circle BREAK on the left", "a1111"),
                         ('("a red circle", "a blue square").blend(0.7, 0.3)', "compel")]:
        with _w.catch_warnings():
            _w.simplefilter("error")                # no "it never saw 'blend'" warning
            pipe.generate(text, prompt_syntax=syntax, steps=2, seed=0, progress=False)
    with pytest.warns(UserWarning, match="'hexagon'"):
        pipe.generate("a (hexagon:1.2)", prompt_syntax="a1111", steps=2, seed=0, progress=False)


def test_compel_mode_warns_about_the_web_uis_weight_syntax():
    from sdlearn.prompt_syntax import parse_compel
    with pytest.warns(UserWarning, match=r"compel writes \(word\)1.3"):
        parse_compel("a (red:1.3) circle")
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("error")
        parse_compel("a (red)1.3 circle, on the left: big")
