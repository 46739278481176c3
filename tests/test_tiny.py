"""The shipped tiny model: loads by default and draws what it is asked for."""
import pytest
import torch

import sdlearn
from sdlearn import shapes
from sdlearn.pipeline import TINY_PATH

pytestmark = pytest.mark.skipif(not TINY_PATH.exists(), reason="the tiny model is not in this checkout")


@pytest.fixture(scope="module")
def pipe():
    return sdlearn.load_pipeline("tiny", device="cpu")


def test_tiny_is_the_default_source(monkeypatch):
    monkeypatch.delenv("SDLEARN_WEIGHTS", raising=False)
    assert sdlearn.default_source() == "tiny"


def test_tiny_file_is_small_and_in_the_original_layout():
    from sdlearn.weights import open_checkpoint
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
    found = shapes.analyse(result.images[0])
    assert {k: found[k] for k in expected} == expected, (prompt, found)


def test_tiny_same_seed_same_pixels(pipe):
    a = pipe.generate("a green circle", seed=3, progress=False).pixels
    b = pipe.generate("a green circle", seed=3, progress=False).pixels
    assert torch.equal(a, b)
