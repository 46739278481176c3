"""The shipped tiny model: loads by default and draws what it is asked for."""
import pytest
import torch

import sdlearn
from sdlearn import analyser, shapes
from sdlearn.sources import TINY_PATH

pytestmark = pytest.mark.skipif(not TINY_PATH.exists(), reason="the tiny model is not in this checkout")


@pytest.fixture(scope="module")
def pipe():
    return sdlearn.load_pipeline("tiny", device="cpu")


def test_tiny_is_the_default_source(monkeypatch):
    monkeypatch.delenv("SDLEARN_WEIGHTS", raising=False)
    assert sdlearn.default_source() == "tiny"


def test_tiny_file_is_small_and_in_the_original_layout():
    from sdlearn.checkpoint import open_checkpoint
    assert TINY_PATH.stat().st_size <= 25e6
    ckpt = open_checkpoint(TINY_PATH)
    assert ckpt.layout == "original"
    assert "sdlearn_config" in ckpt.metadata and "sdlearn_defaults" in ckpt.metadata


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle on the left", {"colour": "red", "shape": "circle", "position": "left"}),
    ("a blue square at the top", {"colour": "blue", "shape": "square", "position": "top"}),
    ("a large yellow triangle on the right", {"colour": "yellow", "shape": "triangle", "position": "right"}),
])
def test_tiny_draws_the_prompt(pipe, prompt, expected):
    result = pipe.generate(prompt, seed=0, progress=False)
    assert result.pixels.shape == (1, 3, 64, 64)
    found = analyser.analyse(result.images[0])
    assert {k: found[k] for k in expected} == expected, (prompt, found)


def test_tiny_same_seed_same_pixels(pipe):
    a = pipe.generate("a green circle", seed=3, progress=False).pixels
    b = pipe.generate("a green circle", seed=3, progress=False).pixels
    assert torch.equal(a, b)


# --- the tiny model says what it knows ---------------------------------------------------------

def _warnings(pipe, *args, **kwargs) -> list[str]:
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.generate(*args, steps=2, seed=0, progress=False, **kwargs)
    return [str(w.message) for w in caught]


def test_words_outside_the_grammar_warn_once_naming_them_and_the_native_size():
    pipe = sdlearn.load_pipeline("tiny", device="cpu")           # a fresh pipeline: nothing warned yet
    first = _warnings(pipe, "a cat sitting on a sofa")
    assert len(first) == 1 and all(w in first[0] for w in ("'cat'", "'sitting'", "'sofa'", "64×64"))
    assert "'a'" not in first[0] and "'on'" not in first[0]
    assert _warnings(pipe, "a cat on a sofa") == []                # each word once
    second = _warnings(pipe, "a pink hexagon, cat")
    assert len(second) == 1 and "'hexagon'" in second[0] and "'pink'" in second[0] and "cat" not in second[0]
    assert _warnings(pipe, ["a large red circle on the left", "blue square, top", ""]) == []
    # the negative prompt is read too (with guidance), and is not read without it
    assert any("'dog'" in w for w in _warnings(pipe, "a red circle", negative_prompt="dog"))
    assert not any("zebra" in w for w in _warnings(pipe, "a red circle", negative_prompt="zebra", guidance=1.0))


def test_a_size_other_than_its_own_warns_once():
    pipe = sdlearn.load_pipeline("tiny", device="cpu")
    warned = _warnings(pipe, "a red circle", height=32, width=48)
    assert len(warned) == 1 and "48×32" in warned[0] and "64×64" in warned[0]
    assert _warnings(pipe, "a red circle", height=32, width=48) == []
    assert _warnings(pipe, "a red circle") == []


def test_a_model_without_a_declared_vocabulary_is_never_checked():
    from checkpoints import original_file
    from sdlearn.configs import ModelConfig
    pipe = sdlearn.load_pipeline(original_file(ModelConfig.tiny()), device="cpu")
    assert pipe.vocabulary is None
    assert _warnings(pipe, "a cat sitting on a sofa", height=32, width=32) == []


def test_vocabulary_metadata_is_read_and_checked():
    from sdlearn.sources import read_vocabulary
    from sdlearn.safetensors_file import CheckpointError
    d = read_vocabulary({"sdlearn_vocabulary": '{"words": ["a", "dot"], "grammar": ["a dot"]}'})
    assert d == {"words": ["a", "dot"], "grammar": ["a dot"]}
    assert read_vocabulary({}) is None
    with pytest.raises(CheckpointError, match="sdlearn_vocabulary"):
        read_vocabulary({"sdlearn_vocabulary": '{"words": "a dot"}'})


def test_sdlearn_info_tiny_lists_the_grammar(capsys):
    from sdlearn.cli import main
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "knows only the grammar" in out and "{circle|square|triangle}" in out and "64×64" in out


def test_ddpm_1000_steps_needs_steps_offset_0_and_says_so(pipe):
    with pytest.raises(ValueError, match=r"steps_offset=0.*--steps-offset 0"):
        pipe.generate("a red circle", sampler="ddpm", steps=1000, progress=False)
    seen = []
    result = pipe.generate("a red circle", sampler="ddpm", steps=10, steps_offset=0, seed=0, progress=False,
                           callback=lambda info: seen.append(info.timestep))
    assert seen == list(range(900, -1, -100)) and result.settings["steps_offset"] == 0


# -- what the loose-caption steps were for (README, "The tiny model"; bench/tiny_quality.py measures all) --

@pytest.mark.usefixtures("one_thread")
def test_guidance_visibly_matters_on_two_object_prompts(pipe):
    """All 120 two-object prompts, held-out pairs included: measured 48 % both right at guidance 1
    and 86 % at 7.5 (the training log's last evaluation). Bounds with a margin for other CPUs:
    ≥ 75 % with guidance and at least 20 points fewer without it (before the loose-caption steps
    the model scored 93 % and 94 %: guidance did not matter)."""
    unguided = analyser.pair_alignment(pipe, guidance=1.0)[0]["both"]
    guided = analyser.pair_alignment(pipe, guidance=7.5)[0]["both"]
    assert guided >= 0.75 and guided - unguided >= 0.2, (unguided, guided)


@pytest.mark.usefixtures("one_thread")
def test_img2img_keeps_the_picture_at_low_strength_and_follows_the_prompt_at_high(pipe):
    """24 one-object pictures (every fourth grammar prompt) re-prompted with another colour and shape: measured (108 pictures)
    1.9 % follow at strength 0.2 and 95 % at 0.9. Bounds: ≤ 20 % and ≥ 75 %."""
    prompts = shapes.grammar_prompts()[::4][:24]
    colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
    others = [(colours[(colours.index(p["colour"]) + 1) % 6], kinds[(kinds.index(p["shape"]) + 1) % 3]) for p in prompts]
    source = pipe.generate([p["prompt"] for p in prompts], seed=0, progress=False).pixels
    follows = {}
    for strength in (0.2, 0.9):
        new = pipe.generate([f"a {c} {s}" for c, s in others], image=source, strength=strength, seed=1,
                            progress=False).pixels
        follows[strength] = sum((r := analyser.analyse(x))["colour"] == c and r["shape"] == s
                                for x, (c, s) in zip(new, others)) / len(others)
    assert follows[0.2] <= 0.2 and follows[0.9] >= 0.75, follows
