"""The synthetic dataset is deterministic and self-consistent (its analyser: tests/test_analyser.py)."""
from collections import Counter

import numpy as np
import pytest
import torch

from sdlearn import analyser, shapes


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
