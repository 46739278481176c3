"""The synthetic dataset is deterministic and self-consistent; the analyser reads it back."""
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


def test_same_seed_same_sample_and_different_seed_different_sample():
    a, b, c = shapes.sample(5, 3), shapes.sample(5, 3), shapes.sample(5, 4)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.attributes == b.attributes
    assert not np.array_equal(a.image, c.image)


def test_dataset_sample_i_does_not_depend_on_n():
    small, large = shapes.make_dataset(5, seed=2), shapes.make_dataset(9, seed=2)
    assert torch.equal(small.images, large.images[:5]) and small.captions == large.captions[:5]
    s = shapes.sample(2, 4, two_shapes=0.1)
    assert torch.equal(torch.from_numpy(s.image).permute(2, 0, 1), large.images[4])


def test_dataset_tensor_layout():
    d = shapes.make_dataset(4, seed=0)
    assert d.images.shape == (4, 3, 64, 64) and d.images.dtype == torch.uint8
    assert len(d.captions) == len(d.attributes) == 4


def test_cache_round_trips(tmp_path):
    first = shapes.make_dataset(20, seed=4, two_shapes=0.5, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    second = shapes.make_dataset(20, seed=4, two_shapes=0.5, cache_dir=tmp_path)
    assert torch.equal(first.images, second.images)
    assert first.captions == second.captions and first.attributes == second.attributes


def test_background_is_plain_and_never_a_shape_colour():
    for name, rgb in shapes.BACKGROUNDS.items():
        colour, distance = analyser.nearest_colour(rgb)
        assert distance > 40, f"background {name} is close to {colour}"
    s = shapes.sample(0, 0)
    bg = shapes.BACKGROUNDS[s.attributes["background"]]
    assert (s.image[0] == bg).all() and (s.image[-1] == bg).all()


def test_captions_say_only_what_is_in_the_picture():
    d = shapes.make_dataset(400, seed=3, two_shapes=0.3)
    n_two = 0
    for text, attrs in zip(d.captions, d.attributes):
        said = shapes.parse_caption(text)
        truth = attrs["shapes"]
        assert len(said) == len(truth), text
        n_two += len(truth) == 2
        for s, t in zip(said, truth):
            assert s["colour"] == t["colour"] and s["shape"] == t["shape"], text
            for key in ("size", "position"):
                assert s[key] in (None, t[key]), text
    assert 60 < n_two < 180


def test_captions_vary_like_the_grammar_says():
    captions = shapes.make_dataset(400, seed=5, two_shapes=0.1).captions
    assert any(c.startswith("a picture of a ") for c in captions)
    assert any(", " in c for c in captions)                  # "red circle, left"
    assert any(" and " in c for c in captions)
    assert any(c.startswith(("a small ", "a large ")) for c in captions)
    assert any(c.endswith(("circle", "square", "triangle")) for c in captions)


def test_every_attribute_value_occurs():
    attrs = [a["shapes"][0] for a in shapes.make_dataset(600, seed=6, two_shapes=0.0).attributes]
    assert set(Counter(a["colour"] for a in attrs)) == set(shapes.COLOURS)
    assert set(Counter(a["shape"] for a in attrs)) == set(shapes.SHAPES)
    assert set(Counter(a["position"] for a in attrs)) == set(shapes.POSITIONS)
    assert set(Counter(a["size"] for a in attrs)) == set(shapes.SIZES)


def test_grammar_prompts_are_the_108_of_the_benchmark():
    prompts = shapes.grammar_prompts()
    assert len(prompts) == 108 == len({p["prompt"] for p in prompts})
    assert {"prompt": "a red circle", "colour": "red", "shape": "circle", "position": None} in prompts
    assert {"prompt": "a orange triangle at the bottom", "colour": "orange", "shape": "triangle",
            "position": "bottom"} in prompts
    assert sum(p["position"] is None for p in prompts) == 18
    for p in prompts:
        said = shapes.parse_caption(p["prompt"])[0]
        assert (said["colour"], said["shape"], said["position"]) == (p["colour"], p["shape"], p["position"])


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


def test_image_grid_shows_each_image_with_its_caption():
    import matplotlib
    matplotlib.use("Agg")
    from sdlearn import viz

    d = shapes.make_dataset(5, seed=0)
    fig = viz.image_grid(list(d.images), d.captions, ncols=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6 and len(shown) == 5
    assert np.array_equal(shown[2].images[0].get_array(), d.images[2].permute(1, 2, 0).numpy())
    assert shown[2].get_title().replace("\n", " ") == d.captions[2]
    with pytest.raises(ValueError, match="one caption per image"):
        viz.image_grid(list(d.images), d.captions[:2])


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
