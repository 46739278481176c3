"""The synthetic dataset (grammar v2): deterministic, self-consistent, balanced, with three
colour–shape pairs held out of training; and its fixed benchmark prompt sets.
(Reading pictures back is tests/test_analyser.py.)"""
from collections import Counter

import numpy as np
import pytest
import torch

from sdlearn import analyser, shapes


@pytest.fixture(scope="module")
def training():
    """What the trainer draws: held-out pairs left out, a third of the pictures with two shapes."""
    return shapes.make_dataset(1500, seed=3, two_shapes=0.35)


def _objects(data):
    return [s for attrs in data.attributes for s in attrs["shapes"]]


# ----------------------------------------------------------------------------------- determinism and layout

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


def test_cache_round_trips_and_keeps_held_out_choices_apart(tmp_path):
    first = shapes.make_dataset(20, seed=4, two_shapes=0.5, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    second = shapes.make_dataset(20, seed=4, two_shapes=0.5, cache_dir=tmp_path)
    assert torch.equal(first.images, second.images)
    assert first.captions == second.captions and first.attributes == second.attributes
    every_pair = shapes.make_dataset(20, seed=4, two_shapes=0.5, held_out=(), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2                   # not the held-out file read back
    assert every_pair.captions == shapes.make_dataset(20, seed=4, two_shapes=0.5, held_out=()).captions


def test_background_is_plain_and_never_a_shape_colour():
    for name, rgb in shapes.BACKGROUNDS.items():
        colour, distance = analyser.nearest_colour(rgb)
        assert distance > 40, f"background {name} is close to {colour}"
    s = shapes.sample(0, 0)
    bg = shapes.BACKGROUNDS[s.attributes["background"]]
    assert (s.image[0] == bg).all() and (s.image[-1] == bg).all()


# ----------------------------------------------------------------------------------- captions

def test_captions_say_only_what_is_in_the_picture(training):
    for text, attrs in zip(training.captions, training.attributes):
        said, truth = shapes.parse_caption(text), attrs["shapes"]
        assert len(said) == len(truth), text
        if len(truth) == 2:        # either may be mentioned first; each says where it is
            assert all(s["position"] is not None for s in said), text
            said = sorted(said, key=lambda s: [t["position"] for t in truth].index(s["position"]))
        for s, t in zip(said, truth):
            assert s["colour"] is not None or s["shape"] is not None, text     # at most one left out
            for key in ("colour", "shape", "size", "position"):
                assert s[key] in (None, t[key]), text


def test_captions_vary_like_the_grammar_says(training):
    captions = training.captions
    one = [c for c in captions if " and " not in c]
    two = [c for c in captions if " and " in c]
    assert any(c.startswith("a picture of a ") for c in one)
    assert any(", " in c for c in one)                                    # "red circle, left"
    assert any(c.startswith(("a small ", "a large ")) for c in one)
    assert any(c.endswith(("circle", "square", "triangle")) for c in one)
    assert any(" shape" in c for c in one) and any(shapes.parse_caption(c)[0]["colour"] is None for c in one)
    assert any(c.startswith(("an orange ", "a picture of an orange ")) for c in captions)
    assert not any(" a orange" in f" {c}" for c in captions)
    for first, second in (("on the left", "on the right"), ("at the top", "at the bottom")):
        assert any(f" {first} and " in c for c in two) and any(f" {second} and " in c for c in two)
    assert any(c.startswith("a picture of ") for c in two)
    assert any(" and a small " in c or " and a large " in c for c in two)
    assert set(shapes.vocabulary()) >= {w for c in captions for w in c.replace(",", "").split()}


def test_rewordings_of_a_pair_mention_either_object_first():
    pair = shapes.sample(0, 1, two_shapes=1.0).attributes["shapes"]
    firsts = {shapes.parse_caption(shapes.caption(pair, np.random.default_rng(k)))[0]["position"] for k in range(20)}
    assert firsts == {pair[0]["position"], pair[1]["position"]}


# ----------------------------------------------------------------------------------- what is drawn

def test_every_attribute_value_occurs(training):
    objects = _objects(training)
    assert {s["colour"] for s in objects} == set(shapes.COLOURS)
    assert {s["shape"] for s in objects} == set(shapes.SHAPES)
    assert {s["position"] for s in objects} == set(shapes.POSITIONS)
    assert {s["size"] for s in objects} == set(shapes.SIZES)
    assert {a["background"] for a in training.attributes} == set(shapes.BACKGROUNDS)


def test_held_out_pairs_never_occur_in_training_but_their_colours_and_shapes_do(training):
    drawn = Counter((s["colour"], s["shape"]) for s in _objects(training))
    assert not set(drawn) & set(shapes.HELD_OUT)
    assert set(drawn) == {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES} - set(shapes.HELD_OUT)
    for colour, shape in shapes.HELD_OUT:                 # each still seen with other partners
        assert sum(n for (c, _), n in drawn.items() if c == colour) > 100
        assert sum(n for (_, s), n in drawn.items() if s == shape) > 100
    everything = shapes.make_dataset(600, seed=3, two_shapes=0.35, held_out=())
    assert set(shapes.HELD_OUT) <= {(s["colour"], s["shape"]) for s in _objects(everything)}


def test_colours_and_shapes_stay_uniform_with_pairs_held_out(training):
    objects = _objects(training)
    n = len(objects)
    for key, values in (("colour", shapes.COLOURS), ("shape", shapes.SHAPES)):
        counts = Counter(s[key] for s in objects)
        expected = n / len(values)                       # binomial sd ≈ √expected; allow 4 of them
        assert all(abs(counts[v] - expected) < 4 * expected ** 0.5 for v in values), (key, counts)


def test_held_out_pairs_must_leave_every_colour_and_shape_a_partner():
    with pytest.raises(ValueError, match="no partner"):
        shapes.sample(0, 0, held_out=[("red", s) for s in shapes.SHAPES])
    with pytest.raises(ValueError, match="outside the palette"):
        shapes.make_dataset(2, held_out=[("pink", "circle")])
    drawn = [shapes.sample(0, i, held_out=[("red", "circle"), ("red", "square")]).attributes["shapes"][0]
             for i in range(200)]
    assert {s["shape"] for s in drawn if s["colour"] == "red"} == {"triangle"}


def test_colour_partners_and_place_the_public_pieces_of_sampling():
    partners = shapes.colour_partners(shapes.HELD_OUT)
    assert all((c, s) not in shapes.HELD_OUT for c, ss in partners.items() for s in ss)
    assert sum(map(len, partners.values())) == len(shapes.COLOURS) * len(shapes.SHAPES) - len(shapes.HELD_OUT)
    obj = {"colour": "red", "shape": "circle", "size": "small", "position": "left"}
    placed = [shapes.place(np.random.default_rng(i), obj) for i in range(50)]
    x, y = shapes.POSITIONS["left"]
    assert all(p.items() >= obj.items() for p in placed) and "cx" not in obj
    assert all(abs(p["cx"] - x * shapes.SIZE) <= shapes.POSITION_JITTER * shapes.SIZE + 1e-3 for p in placed)
    assert all(abs(p["extent"] - shapes.SIZES["small"] * shapes.SIZE) <= shapes.SIZE_JITTER * shapes.SIZE + 1e-3
               for p in placed)
    assert len({p["cx"] for p in placed}) == 50                     # jittered


def test_two_shapes_sit_on_opposite_sides_and_never_touch(training):
    pairs = [a["shapes"] for a in training.attributes if len(a["shapes"]) == 2]
    assert 400 < len(pairs) < 650
    assert Counter(tuple(s["position"] for s in p) for p in pairs).keys() == set(shapes.PAIRS)
    assert min(shapes.gap(*p) for p in pairs) >= shapes.MIN_GAP
    sizes = Counter(tuple(s["size"] for s in p) for p in pairs)
    assert len(sizes) == 4 and min(sizes.values()) > len(pairs) / 8, sizes     # large + large too
    for p in pairs:
        for s in p:
            assert 0 <= s["cx"] - s["extent"] / 2 and s["cx"] + s["extent"] / 2 <= shapes.SIZE
            assert 0 <= s["cy"] - s["extent"] / 2 and s["cy"] + s["extent"] / 2 <= shapes.SIZE


# ----------------------------------------------------------------------------------- benchmark prompt sets

def _said(prompt):
    return [(s["colour"], s["shape"], s["size"], s["position"]) for s in shapes.parse_caption(prompt)]


def test_grammar_prompts_are_the_108_of_the_benchmark():
    prompts = shapes.grammar_prompts()
    assert len(prompts) == 108 == len({p["prompt"] for p in prompts})
    assert {"prompt": "a red circle", "colour": "red", "shape": "circle", "size": None, "position": None,
            "held_out": False} in prompts
    assert {"prompt": "a purple triangle at the bottom", "colour": "purple", "shape": "triangle", "size": None,
            "position": "bottom", "held_out": True} in prompts
    assert sum(p["position"] is None for p in prompts) == 18
    assert sum(p["held_out"] for p in prompts) == 18
    for p in prompts:
        assert p["held_out"] == ((p["colour"], p["shape"]) in shapes.HELD_OUT)
        assert _said(p["prompt"]) == [(p["colour"], p["shape"], None, p["position"])]


def test_held_out_prompts_ask_for_held_out_pairs_in_every_size_and_place():
    prompts = shapes.held_out_prompts()
    assert len(prompts) == 54 == len({p["prompt"] for p in prompts})
    assert {(p["colour"], p["shape"]) for p in prompts} == set(shapes.HELD_OUT) and all(p["held_out"] for p in prompts)
    assert Counter(p["size"] for p in prompts) == {None: 18, "small": 18, "large": 18}
    assert "a large green circle on the left" in [p["prompt"] for p in prompts]
    for p in prompts:
        assert _said(p["prompt"]) == [(p["colour"], p["shape"], p["size"], p["position"])]


def test_pair_prompts_are_a_balanced_set_of_two_distinct_objects():
    prompts = shapes.pair_prompts()
    assert len(prompts) == 120 == len({p["prompt"] for p in prompts})
    assert Counter(p["layout"] for p in prompts) == {("left", "right"): 60, ("top", "bottom"): 60}
    mentioned_first = Counter(p["objects"][0]["position"] for p in prompts)
    assert mentioned_first == {"left": 30, "right": 30, "top": 30, "bottom": 30}       # both orders
    for p in prompts:
        a, b = p["objects"]
        assert a["colour"] != b["colour"] and a["shape"] != b["shape"]
        assert {a["position"], b["position"]} == set(p["layout"])
        assert p["held_out"] == (a["held_out"] or b["held_out"])
        assert all(o["held_out"] == ((o["colour"], o["shape"]) in shapes.HELD_OUT) for o in p["objects"])
        assert _said(p["prompt"]) == [(o["colour"], o["shape"], o["size"], o["position"]) for o in p["objects"]]
    objects = [o for p in prompts for o in p["objects"]]
    for side in ("left", "right", "top", "bottom"):          # every colour and shape, as often on each side
        here = [o for o in objects if o["position"] == side]
        assert set(Counter(o["colour"] for o in here).values()) == {10}
        assert set(Counter(o["shape"] for o in here).values()) == {20}
        assert Counter(o["size"] for o in here) == {None: 30, "small": 15, "large": 15}
    assert 30 <= sum(p["held_out"] for p in prompts) <= 40
    assert "a green circle on the right and a red square on the left" in [p["prompt"] for p in prompts]


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


# ----------------------------------------------------------------------------------- loose captions

def _differences(truth, wrong):
    return [(key, t[key], w[key]) for t, w in zip(truth, wrong) for key in t if t[key] != w[key]]


def test_a_mistake_changes_exactly_one_thing_and_never_names_a_held_out_pair(training):
    rng, kinds = np.random.default_rng(0), Counter()
    for attrs in training.attributes[:600]:
        truth = attrs["shapes"]
        wrong = shapes.mistake(truth, rng)
        assert truth == attrs["shapes"]                       # a copy: the picture's labels stay true
        diff = _differences(truth, wrong)
        assert all((w["colour"], w["shape"]) not in shapes.HELD_OUT for w in wrong)
        if len(truth) == 2 and {k for k, _, _ in diff} == {"position"}:
            assert [w["position"] for w in wrong] == [t["position"] for t in truth][::-1]
            kinds["swapped"] += 1
            continue
        keys = sorted(k for k, _, _ in diff)
        assert keys in (["colour"], ["shape"], ["colour", "shape"]), diff
        assert len(truth) == 1 or len({k for k, _, _ in diff}) == 1 and keys != ["colour", "shape"], diff
        kinds[(len(truth), "+".join(keys))] += 1
    assert set(kinds) == {"swapped", (1, "colour"), (1, "shape"), (1, "colour+shape"), (2, "colour"), (2, "shape")}


def test_caption_noise_zero_keeps_the_captions_and_p_makes_a_share_p_of_them_wrong(training):
    from sdlearn import train

    small = shapes.ShapeDataset(training.images[:400], training.captions[:400], training.attributes[:400])
    clean = train.caption_ids(small, train.Settings(captions_per_image=3))
    assert clean.shape == (400, 3, 77)
    assert torch.equal(clean[:, 0], train.default_tokenizer()(small.captions))   # the dataset's own caption first
    tok = train.default_tokenizer()
    by_hand = [[own] + [shapes.caption(attrs["shapes"], np.random.default_rng([0, i, k])) for k in (1, 2)]
               for i, (own, attrs) in enumerate(zip(small.captions, small.attributes))]
    assert torch.equal(clean, tok([t for row in by_hand for t in row]).view(400, 3, 77))   # what p = 0 always gave
    noisy = train.caption_ids(small, train.Settings(captions_per_image=3, caption_noise=0.3))
    assert torch.equal(noisy, train.caption_ids(small, train.Settings(captions_per_image=3, caption_noise=0.3)))
    changed = (noisy != clean).any(-1).float().mean().item()
    assert 0.22 < changed < 0.38, changed                 # a mistake is a different caption of the same picture
    wrong, rows = 0, torch.nonzero((noisy != clean).any(-1)).tolist()
    for i, k in rows:
        said, truth = shapes.parse_caption(tok.decode(noisy[i, k])), small.attributes[i]["shapes"]
        assert len(said) == len(truth)                    # still a caption of this many objects
        assert not any((o["colour"], o["shape"]) in shapes.HELD_OUT for o in said)
        if len(truth) == 2:
            said = sorted(said, key=lambda s: [t["position"] for t in truth].index(s["position"]))
        wrong += any(s[key] not in (None, t[key]) for s, t in zip(said, truth) for key in ("colour", "shape"))
    assert wrong / len(rows) > 0.8, (wrong, len(rows))    # the rest: a re-wording that left the mistake out


def test_a_mistake_refuses_shapes_no_training_picture_shows():
    held = {"colour": "purple", "shape": "triangle", "size": "small", "position": "left"}
    other = {"colour": "green", "shape": "circle", "size": "small", "position": "right"}
    for objects in ([held], [held, other], [held, {**other, "colour": "red"}]):
        with pytest.raises(ValueError, match="never show a held-out pair"):
            shapes.mistake(objects, np.random.default_rng(0))
