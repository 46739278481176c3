"""Textual inversion against diffusers' `StableDiffusionPipeline.load_textual_inversion`.

The same embedding files (diffusers' learned_embeds, the web UI's .pt and .safetensors, one and
several vectors) loaded into sdlearn and into diffusers, with the same random weights: the token
ids equal transformers' CLIPTokenizer's, and the text encoder's last hidden state agrees within
1e-5 relative error. Tiny size by default; a full-size (SD v1.5, 49,408 × 768 table) text encoder
under `make test-full`.
"""
from __future__ import annotations

import warnings

import numpy as np

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import diffusers_folder, write_tokenizer_files
from reference import cache_dir, rel_err
from sdlearn import textual_inversion, weighted_text
from sdlearn.configs import CLIPTextConfig, ModelConfig
from sdlearn.pipeline import load_pipeline
from sdlearn.prompt_syntax import parse_a1111
from sdlearn.tokenizer import default_tokenizer

TINY = ModelConfig.tiny()
TOL = 1e-5
# A full-size text encoder (the part textual inversion changes) with a small UNet and VAE.
SD15_TEXT = TINY.replace(text_encoder=CLIPTextConfig.sd15(), unet=TINY.unet.replace(cross_attention_dim=768))


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


def pair(config: ModelConfig):
    """sdlearn and diffusers pipelines with the same random weights (a cached diffusers folder)."""
    from diffusers import StableDiffusionPipeline

    folder = diffusers_folder(config)
    ours = load_pipeline(folder, "cpu", torch.float32)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                  local_files_only=True)
    ref.tokenizer.model_max_length = 77
    return ours, ref


def embedding_files(folder, width: int, seed: int = 0) -> dict[str, tuple]:
    """The formats people share, with random rows: {file: (token to pass to diffusers or None,
    prompts that use it)}. Tokens are what sdlearn reads from each file."""
    g = torch.Generator().manual_seed(seed)
    rows = lambda n: torch.randn(n, width, generator=g) * 0.02   # noqa: E731  (CLIP rows are about this size)
    files = {}
    save_file({"<cat-toy>": rows(1)[0]}, str(folder / "learned_embeds.safetensors"))   # diffusers, (D,)
    files[folder / "learned_embeds.safetensors"] = (None, ["a <cat-toy> on a beach", "<cat-toy>,<cat-toy>"])
    torch.save({"<multi>": rows(3)}, folder / "learned_embeds.bin")                     # diffusers, (n, D)
    files[folder / "learned_embeds.bin"] = (None, ["a photo of <multi> and <cat-toy>", "<multi>"])
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows(2)}, "name": "webui-tok",
                "step": 3000, "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5"}, folder / "webui.pt")
    files[folder / "webui.pt"] = (None, ["webui-tok, masterpiece", "a webui-tok  cat"])
    save_file({"emb_params": rows(1)}, str(folder / "ui-style.safetensors"))             # web UI safetensors
    files[folder / "ui-style.safetensors"] = ("ui-style", ["in ui-style", "UI-Style portrait of <multi>"])
    return files


def check_parity(ours, ref, prompts: list[str]) -> None:
    expanded = ref.maybe_convert_prompt(prompts, ref.tokenizer)
    want_ids = ref.tokenizer(expanded, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    got_ids = ours.tokenizer([textual_inversion.expand_prompt(ours.tokenizer, p) for p in prompts])
    assert got_ids.tolist() == want_ids.tolist(), prompts
    with torch.no_grad():
        want = ref.encode_prompt(prompts, "cpu", 1, False)[0]
        got = ours.encode_prompts(prompts)
    assert rel_err(got, want) <= TOL


def load_all_and_compare(config: ModelConfig, folder) -> None:
    ours, ref = pair(config)
    width = config.text_encoder.hidden_size
    for path, (token, prompts) in embedding_files(folder, width).items():
        added = ours.load_textual_inversion(path)
        ref.load_textual_inversion(str(path), token=token)
        assert added[0] == (token or added[0]) and set(added) <= set(ref.tokenizer.get_vocab())
        check_parity(ours, ref, prompts)
    assert ours.text_encoder.text_model.embeddings.token_embedding.weight.shape == (49408 + 7, width)


def test_every_format_gives_diffusers_ids_and_text_encoder_output(tmp_path):
    load_all_and_compare(TINY, tmp_path)


@pytest.mark.full
def test_every_format_matches_diffusers_with_a_full_size_text_encoder(tmp_path):
    load_all_and_compare(SD15_TEXT, tmp_path)


# -- the tokenizer's added tokens --------------------------------------------------------------

ADDED = ["<star>", "<Cat-Toy>", "qqtok", "my tok", "<star>_1", "x_1"]
PROMPTS = ["a red <star> on the left", "a <STAR>", "a<star>s", "<star><star>", "<cat-toy>", "a <Cat-Toy>!",
           "a qqtok dog", "aqqtokb", "my tok here", "my  tok", "MY TOK", "<|startoftext|><star>", " <star> ",
           "a x_1 b", "<star> <star>_1", "<star>_1<star>", "<star>_12", "the <star>'s arm", "日本 <star>"]


def test_added_tokens_are_matched_as_transformers_does():
    from transformers import CLIPTokenizer

    vocab, merges = write_tokenizer_files(cache_dir("tokenizer-files"))
    ref = CLIPTokenizer(str(vocab), str(merges))
    assert ref.add_tokens(ADDED) == len(ADDED)
    ours = default_tokenizer().with_added_tokens(ADDED)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours(PROMPTS).tolist() == want
    assert ours.vocab_size == len(ref) and ours.added_tokens == {t: ref.convert_tokens_to_ids(t) for t in ADDED}
    assert ours.decode(ours.encode("a <star> on the left")) == "a <star> on the left"


def test_adding_tokens_leaves_the_shared_tokenizer_alone():
    base = default_tokenizer()
    before = base("a <star>").tolist()
    with_star = base.with_added_tokens(["<star>"])
    assert base("a <star>").tolist() == before and not base.added_tokens
    assert with_star("a <star>")[0, 2].item() == 49408
    assert with_star.without_added_tokens()("a <star>").tolist() == before


@pytest.mark.parametrize("token, match", [("triangle", "the word 'triangle'"), ("circle</w>", "already in the vocabulary"),
                                          ("tri", "already in the vocabulary")])
def test_a_token_that_is_already_a_word_is_refused(token, match):
    with pytest.raises(ValueError, match=match):
        default_tokenizer().with_added_tokens([token])


# -- errors: nothing changes --------------------------------------------------------------------

@pytest.fixture
def tiny():
    return load_pipeline(diffusers_folder(TINY), "cpu", torch.float32)


def table(pipe) -> torch.Tensor:
    return textual_inversion.token_embedding(pipe).weight


def bad_files(folder):
    save_file({"emb_params": torch.zeros(2, 1024)}, str(folder / "sd2.safetensors"))
    save_file({"clip_l": torch.zeros(2, 64), "clip_g": torch.zeros(2, 1280)}, str(folder / "sdxl.safetensors"))
    torch.save({"a": torch.zeros(64), "b": torch.zeros(64)}, folder / "two.bin")
    torch.save({"x": torch.nn.Linear(2, 2)}, folder / "pickled_module.pt")   # needs code to unpickle
    torch.save({"x": torch.zeros(3, 4, 64)}, folder / "cube.bin")
    (folder / "embedding.txt").write_text("hello")
    return {"sd2.safetensors": "width 1024 \\(an SD 2.x embedding\\)", "sdxl.safetensors": "SDXL",
            "two.bin": "expected one token's rows", "pickled_module.pt": "weights_only=True",
            "cube.bin": "expected float rows", "embedding.txt": "expected a .safetensors"}


def test_bad_files_get_one_line_errors_and_change_nothing(tiny, tmp_path):
    before = table(tiny).clone()
    for name, match in bad_files(tmp_path).items():
        with pytest.raises(textual_inversion.EmbeddingFileError, match=match) as e:
            tiny.load_textual_inversion(tmp_path / name)
        assert "\n" not in str(e.value)
        assert torch.equal(table(tiny), before) and not tiny.tokenizer.added_tokens


def test_an_existing_token_is_refused_and_not_overwritten(tiny, tmp_path):
    save_file({"<star>": torch.ones(64)}, str(tmp_path / "a.safetensors"))
    save_file({"<star>": -torch.ones(64)}, str(tmp_path / "b.safetensors"))
    tiny.load_textual_inversion(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="'<star>': it is already an added token"):
        tiny.load_textual_inversion(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="the word 'triangle'"):
        tiny.load_textual_inversion(tmp_path / "b.safetensors", token="triangle")
    assert table(tiny).shape[0] == 49409 and torch.equal(table(tiny)[-1], torch.ones(64))
    tiny.load_textual_inversion(tmp_path / "b.safetensors", token="<star-2>")
    assert torch.equal(table(tiny)[-1], -torch.ones(64))


# -- unloading ----------------------------------------------------------------------------------

def test_unload_restores_the_table_exactly(tiny, tmp_path):
    before = table(tiny).clone()
    ids = tiny.tokenizer("a red <multi>").tolist()
    files = embedding_files(tmp_path, 64)
    for path in files:
        tiny.load_textual_inversion(path, token=files[path][0])
    assert tiny.tokenizer("a red <multi>").tolist() != ids
    tiny.unload_textual_inversion()
    # Exact: unloading keeps the first 49,408 rows, which loading copied without arithmetic.
    assert torch.equal(table(tiny), before) and tiny.tokenizer("a red <multi>").tolist() == ids
    tiny.unload_textual_inversion()                                  # nothing to unload: no error


def test_unloading_some_tokens_matches_diffusers(tmp_path):
    ours, ref = pair(TINY)
    files = embedding_files(tmp_path, 64)
    for path, (token, _) in files.items():
        ours.load_textual_inversion(path, token=token)
        ref.load_textual_inversion(str(path), token=token)
    gone = ["<multi>", "<multi>_1", "<multi>_2"]
    ours.unload_textual_inversion(gone)
    ref.unload_textual_inversion(gone)
    assert "<multi>" not in ours.tokenizer.added_tokens and table(ours).shape[0] == 49408 + 4
    check_parity(ours, ref, ["a <cat-toy> in ui-style", "webui-tok", "<multi> is plain text again"])
    with pytest.raises(ValueError, match="not loaded"):
        ours.unload_textual_inversion("<multi>")


def test_unloading_a_token_that_is_not_loaded_is_refused_naming_the_loaded_ones(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"cannot unload \['<nope>'\]: not loaded; the loaded tokens are none"):
        tiny.unload_textual_inversion("<nope>")
    save_file({"<star>": torch.ones(64)}, str(tmp_path / "a.safetensors"))
    tiny.load_textual_inversion(tmp_path / "a.safetensors")
    before = table(tiny).clone()
    with pytest.raises(ValueError, match=r"cannot unload \['<nope>'\]: not loaded; the loaded tokens are \['<star>'\]$"):
        tiny.unload_textual_inversion(["<star>", "<nope>"])
    assert torch.equal(table(tiny), before) and list(tiny.tokenizer.added_tokens) == ["<star>"]    # nothing changed


# -- weights on multi-vector tokens ------------------------------------------------------------

WEIGHTED = ["a red circle <night>-", "a red circle (<night>)1.5 on the left", "<night>--, a (blue <night> square)0.7",
            "a red circle <night>", "(<night> <cat-toy>)0.5 circle+"]


def test_a_weight_covers_every_vector_of_a_multi_vector_token_as_in_compel(tmp_path):
    """compel expands an n-vector token in each parsed fragment's ids (its textual-inversion
    manager), so "<night>-" weights all 8 rows; expanding the text before parsing weights the last."""
    compel = pytest.importorskip("compel")
    ours, ref = pair(TINY)
    g = torch.Generator().manual_seed(1)
    save_file({"<night>": torch.randn(8, 64, generator=g) * 0.02}, str(tmp_path / "night.safetensors"))
    save_file({"<cat-toy>": torch.randn(64, generator=g) * 0.02}, str(tmp_path / "cat.safetensors"))
    for name in ("night", "cat"):
        ours.load_textual_inversion(tmp_path / f"{name}.safetensors")
        ref.load_textual_inversion(str(tmp_path / f"{name}.safetensors"))
    reference = compel.Compel(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, truncate_long_prompts=False,
                              textual_inversion_manager=compel.DiffusersTextualInversionManager(ref))
    with torch.no_grad():
        want = torch.cat([reference(p) for p in WEIGHTED])
        got = ours.encode_prompts(WEIGHTED, prompt_syntax="compel")
        text_first = weighted_text.encode_weighted(ours.tokenizer, ours.text_encoder, [
            textual_inversion.expand_prompt(ours.tokenizer, WEIGHTED[0])], "compel")
    assert rel_err(got, want) <= TOL
    assert rel_err(text_first, want[:1]) > 1e-3          # the old order: the weight on the last of 8 rows only


def test_a1111_multipliers_cover_every_vector_and_an_embedding_stays_in_one_chunk():
    tok = default_tokenizer().with_added_tokens(textual_inversion.token_names("<night>", 8))
    night = list(tok.added_tokens.values())
    ids, mults = weighted_text.a1111_chunks(tok, parse_a1111("a red circle (<night>:1.5), left"))[0]
    assert ids[4:12] == night and mults[4:12] == [1.5] * 8 and mults[3] == mults[12] == 1.0
    # 70 words and 8 vectors do not fit in 75: the whole embedding starts the next chunk, as in the web UI
    chunks = weighted_text.a1111_chunks(tok, parse_a1111("word " * 70 + "[<night>]"))
    assert len(chunks) == 2 and not set(night) & set(chunks[0][0])
    assert chunks[1][0][1:9] == night and chunks[1][1][1:9] == [1 / 1.1] * 8


# -- the tiny model -----------------------------------------------------------------------------

def test_a_learned_token_is_no_unknown_word_for_the_tiny_model(tmp_path):
    pipe = load_pipeline("tiny")
    textual_inversion.save(tmp_path / "learned_embeds.safetensors", "<blob>", torch.zeros(64))
    assert pipe.load_textual_inversion(tmp_path) == ["<blob>"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("a red <blob> on the left", steps=1, seed=0, progress=False)


# -- the star: drawn, detected ------------------------------------------------------------------

def test_the_analyser_reads_the_dataset_stars_as_stars_and_nothing_else():
    from sdlearn import analyser, shapes
    from sdlearn.ti_concepts import STAR, concept_dataset

    stars = concept_dataset(STAR, 200, seed=1, sizes=("small", "large"))
    read = [analyser.analyse(im.permute(1, 2, 0).numpy()) for im in stars.images]
    assert np.mean([r["star"] for r in read]) >= 0.95
    assert np.mean([r["colour"] == a["shapes"][0]["colour"] for r, a in zip(read, stars.attributes)]) >= 0.95
    others = shapes.make_dataset(300, seed=2, two_shapes=0.0, held_out=())
    for shape in shapes.SHAPES:
        found = [analyser.analyse(im.permute(1, 2, 0).numpy()) for im, a in zip(others.images, others.attributes)
                 if a["shapes"][0]["shape"] == shape]
        assert len(found) > 50 and not any(r["star"] for r in found), shape


def test_the_star_harmonic_is_five_fold():
    from sdlearn.analyser import angular_harmonic
    from sdlearn.shapes import draw

    star = draw([{"colour": "red", "shape": "star", "cx": 32, "cy": 32, "extent": 40}], (0, 0, 0))[..., 0] / 220
    disc = draw([{"colour": "red", "shape": "circle", "cx": 32, "cy": 32, "extent": 40}], (0, 0, 0))[..., 0] / 220
    assert angular_harmonic(star, 5) > 0.5 and angular_harmonic(star, 3) < 0.05
    assert angular_harmonic(disc, 5) < 0.01 and angular_harmonic(np.rot90(star).copy(), 5) > 0.5


# -- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["STAR", "NIGHT", "PTRI"])
def test_a_training_step_moves_the_new_row_only(name):
    from sdlearn import ti_concepts, ti_train

    concept = getattr(ti_concepts, name)
    pipe = load_pipeline("tiny")
    before = {k: v.clone() for m in (pipe.text_encoder, pipe.unet) for k, v in m.state_dict().items()}
    trainable = [p.requires_grad for p in pipe.unet.parameters()]
    result = ti_train.train(pipe, concept, steps=3, batch=4, images=8, progress=False)
    after = {k: v for m in (pipe.text_encoder, pipe.unet) for k, v in m.state_dict().items()}
    row = pipe.tokenizer.added_tokens[concept.token]
    assert torch.equal(result.initial, ti_train.word_row(pipe, concept.init))
    assert not torch.equal(result.vector, result.initial) and torch.equal(table(pipe)[row], result.vector)
    name = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(after[name][:row], before[name])
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != name)
    assert [p.requires_grad for p in pipe.unet.parameters()] == trainable     # as they were


@pytest.mark.parametrize("name, prompts", [("STAR", ["a red <star> on the left", "a picture of a large <star>"]),
                                           ("NIGHT", ["a red circle on the left <night>", "<night> blue square, top"]),
                                           ("PTRI", ["a small <ptri> at the top", "<ptri>, left"])])
def test_the_shipped_embeddings_load_in_sdlearn_and_diffusers(name, prompts):
    from sdlearn import ti_concepts, ti_train

    path, token = getattr(ti_train, f"{name}_EMBEDDING"), getattr(ti_concepts, name).token
    rows = textual_inversion.read_embeddings(path)[1]
    ours, ref = pair(TINY)
    assert ours.load_textual_inversion(path) == textual_inversion.token_names(token, len(rows))
    ref.load_textual_inversion(str(path))
    check_parity(ours, ref, prompts)                 # the night file's 8 vectors: "<night> <night>_1 … _7"
    tiny = load_pipeline("tiny")
    tiny.load_textual_inversion(path)
    assert table(tiny).shape == (49408 + len(rows), 64) and torch.equal(table(tiny)[49408:], rows)


def test_nearest_words_by_cosine_similarity():
    from sdlearn.ti_train import nearest_words, word_row

    pipe = load_pipeline("tiny")
    row = word_row(pipe, "square")
    assert nearest_words(pipe, row, 1) == [("square", 1.0)]
    assert nearest_words(pipe, 3 * row, 1) == [("square", 1.0)]          # the length does not matter
    with pytest.raises(ValueError, match="2 tokens"):
        word_row(pipe, "red circle")
    among = nearest_words(pipe, row + word_row(pipe, "purple"), 2, words=pipe.vocabulary["words"])
    assert [w for w, _ in among] == ["purple", "square"] or [w for w, _ in among] == ["square", "purple"]
