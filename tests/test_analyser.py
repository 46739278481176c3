"""The analyser reads the dataset's pictures back, clean or degraded, and scores prompts."""
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sdlearn import analyser, shapes

KEYS = ("colour", "shape", "position", "size")


@pytest.fixture(scope="module")
def single():
    return shapes.make_dataset(1000, seed=11, two_shapes=0.0)


def _agreement(images, attributes):
    wrong = Counter()
    for image, attrs in zip(images, attributes):
        got, want = analyser.analyse(image), attrs["shapes"][0]
        for key in KEYS:
            wrong[key] += got[key] != want[key]
    return {key: 1 - wrong[key] / len(images) for key in KEYS}


def test_analyser_reads_back_the_datasets_own_attributes(single):
    agreement = _agreement(list(single.images), single.attributes)
    assert min(agreement.values()) >= 0.99, agreement


@pytest.mark.parametrize("degrade", ["blur", "noise", "blur+noise", "low-res"])
def test_analyser_survives_soft_edges_and_noise(single, degrade):
    rng = np.random.default_rng(0)
    out = []
    for image in single.images[:300]:
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        if "blur" in degrade:
            pil = pil.filter(ImageFilter.GaussianBlur(1.5))
        if degrade == "low-res":   # what a blurry decoder does: detail below 4 px is gone
            pil = pil.resize((16, 16), Image.BILINEAR).resize((64, 64), Image.BICUBIC)
        a = np.asarray(pil).astype(np.float32)
        if "noise" in degrade:
            a = a + rng.normal(0, 10, a.shape)
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    agreement = _agreement(out, single.attributes[:300])
    assert min(agreement.values()) >= 0.99, agreement


def test_analyser_accepts_pil_arrays_and_float_tensors():
    s = shapes.sample(1, 0)
    want = s.attributes["shapes"][0]
    as_float = torch.from_numpy(s.image).permute(2, 0, 1).float() / 255
    for image in (s.pil, s.image, as_float):
        got = analyser.analyse(image)
        assert (got["colour"], got["shape"], got["position"]) == (want["colour"], want["shape"], want["position"])


def test_analyser_finds_nothing_on_a_plain_picture():
    got = analyser.analyse(np.full((64, 64, 3), 200, np.uint8))
    assert got == {"colour": None, "shape": None, "position": None, "size": None, "found": False}


def test_analyser_finds_both_shapes_of_a_pair():
    d = shapes.make_dataset(100, seed=8, two_shapes=1.0)
    for image, attrs in zip(d.images, d.attributes):
        found = analyser.analyse_objects(image)
        assert len(found) == 2
        got = {(o["colour"], o["shape"], o["position"]) for o in found}
        assert got == {(s["colour"], s["shape"], s["position"]) for s in attrs["shapes"]}


def test_score_alignment_counts_only_what_was_asked():
    prompts = shapes.grammar_prompts()[:6]            # a red circle, (no position + 5 positions)
    shapes_ = [{"colour": "red", "shape": "circle", "cx": 32, "cy": 32, "extent": 20}]
    centred = shapes.draw(shapes_, "white")
    scores = analyser.score_alignment([centred] * 6, prompts)
    assert scores["colour"] == scores["shape"] == scores["found"] == 1.0
    assert scores["position"] == pytest.approx(1 / 5)    # only "in the center" is right
    wrong = shapes.draw([dict(shapes_[0], colour="blue", shape="square")], "white")
    assert analyser.score_alignment([wrong], prompts[:1]) == {"colour": 0.0, "shape": 0.0,
                                                           "position": pytest.approx(float("nan"), nan_ok=True),
                                                           "found": 1.0}


class _DrawingPipeline:
    """Stands in for a model: draws what each prompt asks (in another colour if told to)."""

    def __init__(self, recolour=None):
        self.recolour = recolour or {}

    def generate(self, prompts, *, guidance, steps, sampler, seed, progress):
        pixels = []
        for text in prompts:
            want = shapes.parse_caption(text)[0]
            x, y = shapes.POSITIONS[want["position"] or "center"]
            drawn = shapes.draw([{"colour": self.recolour.get(want["colour"], want["colour"]), "shape": want["shape"],
                                  "cx": x * 64, "cy": y * 64, "extent": 20}], "white")
            pixels.append(torch.from_numpy(drawn).permute(2, 0, 1).float() / 255)
        return SimpleNamespace(pixels=torch.stack(pixels))


def test_alignment_of_a_perfect_and_of_a_colour_blind_model():
    scores, pixels = analyser.alignment(_DrawingPipeline())
    assert pixels.shape == (108, 3, 64, 64)
    assert scores == {"colour": 1.0, "shape": 1.0, "position": 1.0, "found": 1.0}
    scores, _ = analyser.alignment(_DrawingPipeline(recolour={"orange": "yellow"}))
    assert scores["colour"] == pytest.approx(5 / 6) and scores["shape"] == 1.0
