"""A synthetic captioned dataset of coloured shapes (its analyser is `sdlearn.analyser`).

The tiny model learns from pictures like "a large red circle on the left": one or two flat
coloured shapes on a plain neutral background, 64×64 RGB. Captions follow the grammar (v2)

    one object   a [small|large] {red|green|blue|yellow|purple|orange} {circle|square|triangle}
                   [on the left|on the right|at the top|at the bottom|in the center]
                 a picture of <that>  ·  red circle, left  ·  red circle
    two objects  <object on the left> and <object on the right>      (either mentioned first)
                 <object at the top> and <object at the bottom>      (either mentioned first)
                 a picture of <that>

where an object in a two-object caption always says where it is and may say its size. Every
sample also carries its structured attributes, so alignment is *measured*: the analyser reads
colour, shape, size and position back from any 64×64 picture, a generated one too.

Three colour–shape pairs, `HELD_OUT`, never occur in training pictures, alone or in a pair,
although each of their colours and shapes does with other partners: whether the model can draw
"a purple triangle" then tests composition, not memory.

    s = sample(7)                              # ShapeSample(image, caption, attributes)
    data = make_dataset(20_000, seed=0)        # uint8 (N, 3, 64, 64), captions, attributes
    grammar_prompts()                          # the 108 one-object benchmark prompts
    held_out_prompts(), pair_prompts()         # 54 held-out-pair prompts, 120 two-object prompts

Everything is deterministic by seed: sample i of `make_dataset(n, seed)` is drawn from
`numpy.random.default_rng([seed, i])`, so it does not depend on n.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Any, Collection, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


SIZE = 64                     # image side in pixels
SUPERSAMPLE = 4               # draw at 4× and average down: anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 85, 225),
    "yellow": (245, 215, 35),
    "purple": (145, 55, 185),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle")
# Drawable but never in the tiny model's grammar or training pictures: a concept to teach it
# afterwards (textual inversion, sdlearn/ti_train.py).
EXTRA_SHAPES = ("star",)
STAR_INNER = 0.45             # a five-pointed star's inner radius / outer radius (regular: 0.382)
SIZES = {"small": 0.25, "large": 0.42}               # side of the bounding box / image side
SIZE_JITTER = 0.02
POSITIONS: dict[str, tuple[float, float]] = {        # centre (x, y) / image side
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_JITTER = 0.03
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
# Neutral backgrounds: low chroma, so no background can be mistaken for a shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242), "light grey": (200, 200, 200), "dark grey": (70, 70, 70),
    "black": (22, 22, 22), "beige": (232, 222, 198),
}
# Two objects go on opposite sides, first side first, with at least MIN_GAP pixels between
# their bounding boxes: they never touch, and a blurred picture still shows two blobs.
PAIRS = (("left", "right"), ("top", "bottom"))
MIN_GAP = 4.0
# Never drawn in training. One per colour and per shape (a matching), so drawing the colour
# uniformly and then the shape uniformly among its allowed partners keeps both uniform; one
# colour from each neighbourhood of the palette (blue–purple, green, red–orange–yellow).
HELD_OUT: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("green", "circle"), ("orange", "square"))


@dataclass(frozen=True)
class ShapeSample:
    """One picture: `image` uint8 (64, 64, 3), its caption, and what is in it.

    attributes = {"background": "white", "shapes": [{"colour", "shape", "size", "position",
    "cx", "cy", "extent"}, …]} with cx, cy, extent in pixels; two shapes are listed left before
    right, top before bottom (the caption may mention them in either order).
    """
    image: np.ndarray
    caption: str
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


class ShapeDataset(NamedTuple):
    images: torch.Tensor            # uint8 (N, 3, 64, 64)
    captions: list[str]
    attributes: list[dict[str, Any]]


# ----------------------------------------------------------------------------------- drawing

def _polygon(shape: str, cx: float, cy: float, e: float) -> list[tuple[float, float]] | None:
    """Corner points of a shape whose bounding box is e × e around (cx, cy); None for a circle."""
    h = e / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # apex up, as wide as it is tall
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":      # five points, one up: 10 corners alternating outer radius h and inner
        radius = [h, h * STAR_INNER] * 5
        return [(cx + r * np.sin(np.pi * k / 5), cy - r * np.cos(np.pi * k / 5)) for k, r in enumerate(radius)]
    return None


STYLES = ("filled", "outline")
OUTLINE_WIDTH = 0.16     # the outline style's line width / the shape's extent (2.5 px small, 4.3 px large)


def draw(shapes: Sequence[dict[str, Any]], background: str | tuple[int, int, int],
         size: int = SIZE, style: str = "filled") -> np.ndarray:
    """Render shapes (dicts with colour, shape, cx, cy, extent in pixels) → uint8 (size, size, 3).

    Drawn at SUPERSAMPLE× the resolution and box-filtered down, so edges are anti-aliased.
    style="outline" draws only each shape's outline, OUTLINE_WIDTH × its extent thick, inside
    the same bounding box (a style the tiny model never saw: what the LoRA of notebook 09 learns).
    """
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {STYLES}")
    bg = BACKGROUNDS[background] if isinstance(background, str) else background
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), bg)
    pen = ImageDraw.Draw(canvas)
    for s in shapes:
        rgb = COLOURS[s["colour"]] if isinstance(s["colour"], str) else s["colour"]
        cx, cy, e = s["cx"] * k, s["cy"] * k, s["extent"] * k
        paint = {"fill": rgb} if style == "filled" else {"outline": rgb, "width": max(1, round(OUTLINE_WIDTH * e))}
        corners = _polygon(s["shape"], cx, cy, e)
        if corners is None:
            pen.ellipse([cx - e / 2, cy - e / 2, cx + e / 2, cy + e / 2], **paint)
        else:
            pen.polygon(corners, **paint)
    return np.array(canvas.resize((size, size), Image.BOX))


# ----------------------------------------------------------------------------------- captions

def article(word: str) -> str:
    """"an" before a vowel ("an orange circle"), else "a"."""
    return "an" if word[:1] in "aeiou" else "a"


def phrase(s: dict[str, Any], *, with_size: bool, with_position: bool, with_colour: bool = True,
           with_shape: bool = True) -> str:
    """'a large red circle on the left' — the grammar's noun phrase for one shape ('a circle on
    the left' without its colour, 'a red shape on the left' without its shape)."""
    words = [s["size"]] if with_size else []
    words += ([s["colour"]] if with_colour else []) + [s["shape"] if with_shape else "shape"]
    if with_position:
        words.append(POSITION_PHRASES[s["position"]])
    return article(words[0]) + " " + " ".join(words)


def caption(shapes: Sequence[dict[str, Any]], rng: np.random.Generator) -> str:
    """A caption for one or two shapes, with the grammar's variations.

    One shape (probabilities): 60 % the grammar with optional size (40 %) and position (75 %),
    10 % "a picture of …", 8 % terse "red circle, left", 7 % bare "red circle", and 15 % that leave
    one attribute out: 8 % no colour ("a circle on the left"), 7 % no shape ("a red shape on the
    left"). Those teach the model to read what the caption does not say from the noisy picture
    itself, so that at low noise it keeps what the picture shows (image-to-image at a low strength
    changes little) instead of redrawing it from the text alone.
    Two shapes: either one first (50 %), each with its position (without, the caption would not
    say which is which) and an optional size (40 % each); 10 % start "a picture of …".
    """
    if len(shapes) == 2:
        first, second = shapes if rng.random() < 0.5 else shapes[::-1]
        text = " and ".join(phrase(s, with_size=rng.random() < 0.4, with_position=True) for s in (first, second))
        return "a picture of " + text if rng.random() < 0.1 else text
    s = shapes[0]
    style = rng.random()
    if style < 0.7:
        text = phrase(s, with_size=rng.random() < 0.4, with_position=rng.random() < 0.75)
        return "a picture of " + text if style >= 0.6 else text
    if style < 0.78:
        return f"{s['colour']} {s['shape']}, {s['position']}"
    if style < 0.85:
        return f"{s['colour']} {s['shape']}"
    return phrase(s, with_size=rng.random() < 0.4, with_position=rng.random() < 0.75,
                  with_colour=style >= 0.93, with_shape=style < 0.93)


def mistake(shapes: Sequence[dict[str, Any]], rng: np.random.Generator,
            held_out: Collection[tuple[str, str]] = HELD_OUT) -> list[dict[str, Any]]:
    """The shapes of a training picture as a careless captioner describes them: a copy with one
    thing wrong.

    Two shapes: with probability ½ the sides are swapped ("a blue square on the left and a red
    circle on the right" for the opposite picture); otherwise one object, either, gets another
    colour or another shape (one draw each). One shape: its colour, its shape, or both replaced
    (one draw each). Positions and sizes of single shapes stay right. A mistake never names a
    `held_out` pair: a replacement that would is drawn again (rejection sampling, so a kind with
    fewer allowed replacements comes up a little less often than its nominal share), and since
    training pictures never show one, shapes that do are refused with a ValueError. Two objects
    of the same colour and shape read the same when swapped: that draw leaves the caption right.

    Training on some such captions (`caption_noise` in sdlearn/train.py) is what makes the tiny
    model need guidance: its captions, like web alt-texts, no longer always say exactly what the
    picture shows."""
    shown = [(s["colour"], s["shape"]) for s in shapes if (s["colour"], s["shape"]) in held_out]
    if shown:
        raise ValueError(f"mistake() describes training pictures, which never show a held-out pair; got {shown}")

    def other(value: str, choices) -> str:
        return str(rng.choice([c for c in choices if c != value]))

    if len(shapes) == 2 and rng.random() < 0.5:
        a, b = shapes
        return [a | {"position": b["position"]}, b | {"position": a["position"]}]
    while True:   # re-draw until the wrong description names no held-out pair (a few tries at most)
        out = [dict(s) for s in shapes]
        target = out[int(rng.integers(len(out)))]
        kind = int(rng.integers(3)) if len(out) == 1 else 1 + int(rng.integers(2))   # 0 both, 1 colour, 2 shape
        if kind in (0, 1):
            target["colour"] = other(target["colour"], COLOURS)
        if kind in (0, 2):
            target["shape"] = other(target["shape"], SHAPES)
        if all((o["colour"], o["shape"]) not in held_out for o in out):
            return out

_WORD = {w: ("colour", w) for w in COLOURS} | {w: ("shape", w) for w in SHAPES} \
    | {w: ("size", w) for w in SIZES} | {w: ("position", w) for w in POSITIONS} | {"centre": ("position", "center")}


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """What a caption asks for, one dict per shape in the order mentioned ("… and …"), None
    where it says nothing.

    "a large red circle on the left" → [{"colour": "red", "shape": "circle", "size": "large",
    "position": "left"}]. Understands every caption `caption()` writes and every benchmark prompt.
    """
    found = []
    for part in re.split(r"\band\b", text.lower()):
        attrs: dict[str, str | None] = {"colour": None, "shape": None, "size": None, "position": None}
        for word in re.findall(r"[a-z]+", part):
            if word in _WORD:
                key, value = _WORD[word]
                attrs[key] = value
        if any(attrs.values()):
            found.append(attrs)
    return found


# ----------------------------------------------------------------------------------- sampling

def colour_partners(held_out: Collection[tuple[str, str]]) -> dict[str, list[str]]:
    """colour → the shapes it may be drawn as: every shape but those `held_out` pairs with it
    ({"purple": ["circle", "square"], …} for HELD_OUT); every colour and shape must keep a partner."""
    held = {tuple(pair) for pair in held_out}
    unknown = [pair for pair in held if pair[0] not in COLOURS or pair[1] not in SHAPES]
    if unknown:
        raise ValueError(f"held_out has pairs outside the palette and shapes: {unknown}; "
                         f"colours are {list(COLOURS)}, shapes {list(SHAPES)}")
    partners = {c: [s for s in SHAPES if (c, s) not in held] for c in COLOURS}
    lonely = [c for c, ss in partners.items() if not ss] + [s for s in SHAPES if all(s not in ss for ss in partners.values())]
    if lonely:
        raise ValueError(f"held_out leaves {lonely} with no partner at all; hold out fewer pairs")
    return partners


def _object(rng: np.random.Generator, position: str, partners: dict[str, list[str]]) -> dict[str, Any]:
    """What one object is: colour (uniform), shape (uniform among the colour's partners), size."""
    colour = str(rng.choice(list(COLOURS)))
    return {"colour": colour, "shape": str(rng.choice(partners[colour])), "size": str(rng.choice(list(SIZES))),
            "position": position}


def place(rng: np.random.Generator, s: dict[str, Any]) -> dict[str, Any]:
    """Where an object (colour, shape, size, position) goes: its position's anchor and its size,
    each jittered; returns a copy with cx, cy and extent in pixels, ready for `draw`."""
    x, y = POSITIONS[s["position"]]
    jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    extent = SIZES[s["size"]] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    return s | {"cx": round(float((x + jitter[0]) * SIZE), 3), "cy": round(float((y + jitter[1]) * SIZE), 3),
                "extent": round(float(extent * SIZE), 3)}


def gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Pixels between the bounding boxes of two placed shapes (negative: they overlap)."""
    return max(abs(a["cx"] - b["cx"]), abs(a["cy"] - b["cy"])) - (a["extent"] + b["extent"]) / 2


def _sample(rng: np.random.Generator, two_shapes: float, partners: dict[str, list[str]]) -> ShapeSample:
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < two_shapes:
        pair = PAIRS[rng.integers(len(PAIRS))]
        objects = [_object(rng, p, partners) for p in pair]
        while True:   # jitter again until MIN_GAP holds (two large shapes: about one try in five)
            shapes = [place(rng, s) for s in objects]
            if gap(*shapes) >= MIN_GAP:
                break
    else:
        shapes = [place(rng, _object(rng, str(rng.choice(list(POSITIONS))), partners))]
    return ShapeSample(draw(shapes, background), caption(shapes, rng), {"background": background, "shapes": shapes})


def sample(seed: int, index: int = 0, *, two_shapes: float = 0.0,
           held_out: Collection[tuple[str, str]] = HELD_OUT) -> ShapeSample:
    """The picture drawn from `default_rng([seed, index])`; `two_shapes` = P(two shapes).

    No object is one of the (colour, shape) pairs in `held_out`; pass `held_out=()` to draw any.
    """
    return _sample(np.random.default_rng([seed, index]), two_shapes, colour_partners(held_out))


_C, _S = "{" + "|".join(COLOURS) + "}", "{" + "|".join(SHAPES) + "}"
GRAMMAR = (
    f"a|an [small|large] {_C} {_S} [" + "|".join(POSITION_PHRASES.values()) + "]",
    "a picture of <the above>",
    f"{_C} {_S}[, " + "{" + "|".join(POSITIONS) + "}]",
    f"a [small|large] {_S} [position]        a|an [small|large] {_C} shape [position]   (colour or shape left out)",
    "<an object on the left> and <an object on the right>   (either first; or at the top and at the bottom)",
)


def vocabulary() -> list[str]:
    """Every word a caption can hold (what the tiny model has seen), sorted."""
    words = {"a", "an", "picture", "of", "and", "shape", *COLOURS, *SHAPES, *SIZES, *POSITIONS}
    for text in POSITION_PHRASES.values():
        words.update(text.split())
    return sorted(words)


DATASET_VERSION = 2  # bump when drawing or captions change, so old caches are not reused


def _held_out_tag(held_out: Collection[tuple[str, str]]) -> str:
    pairs = sorted({tuple(p) for p in held_out})
    return "-".join(f"{c}_{s}" for c, s in pairs) or "none"


def make_dataset(n: int, seed: int = 0, *, two_shapes: float = 0.1, held_out: Collection[tuple[str, str]] = HELD_OUT,
                 cache_dir: str | Path | None = None) -> ShapeDataset:
    """n samples → ShapeDataset(images uint8 (n, 3, 64, 64), captions, attributes).

    `held_out`: (colour, shape) pairs no picture shows (default HELD_OUT, for training; `()`
    draws every pair, e.g. to test the analyser). About 0.5 ms per image; with `cache_dir` the
    result is stored once as a compressed .npz (a few MB for 20,000 images) and read back on
    later calls with the same arguments.
    """
    partners = colour_partners(held_out)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / (f"shapes-v{DATASET_VERSION}-n{n}-seed{seed}-two{two_shapes:g}"
                                  f"-without-{_held_out_tag(held_out)}.npz")
        if path.exists():
            with np.load(path) as f:
                return ShapeDataset(torch.from_numpy(f["images"]), json.loads(str(f["captions"])),
                                    json.loads(str(f["attributes"])))
    samples = [_sample(np.random.default_rng([seed, i]), two_shapes, partners) for i in range(n)]
    images = np.stack([s.image for s in samples]).transpose(0, 3, 1, 2).copy()
    data = ShapeDataset(torch.from_numpy(images), [s.caption for s in samples], [s.attributes for s in samples])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=images, captions=json.dumps(data.captions),
                            attributes=json.dumps(data.attributes))
        tmp.replace(path)
    return data


# ----------------------------------------------------------------------------------- benchmark prompt sets

def is_held_out(colour: str, shape: str) -> bool:
    """Whether training never shows this colour–shape pair (it is in HELD_OUT)."""
    return (colour, shape) in HELD_OUT


def _one(colour: str, shape: str, position: str | None, size: str | None = None) -> dict[str, Any]:
    words = [w for w in (size, colour, shape, position and POSITION_PHRASES[position]) if w]
    words = [article(words[0])] + words
    return {"prompt": " ".join(words), "colour": colour, "shape": shape, "size": size, "position": position,
            "held_out": is_held_out(colour, shape)}


def grammar_prompts() -> list[dict[str, Any]]:
    """The 108 one-object benchmark prompts: 6 colours × 3 shapes × (no position + 5 positions).

    Each entry: {"prompt": "a red circle on the left", "colour": "red", "shape": "circle",
    "size": None, "position": "left", "held_out": False} (position None for "a red circle");
    18 of them (3 pairs × 6) ask for a HELD_OUT pair and say so.
    """
    return [_one(colour, shape, position) for colour in COLOURS for shape in SHAPES for position in (None, *POSITIONS)]


def held_out_prompts() -> list[dict[str, Any]]:
    """The 54 one-object prompts for the HELD_OUT pairs: 3 pairs × (no size, small, large) ×
    (no position + 5 positions), entries as in `grammar_prompts` ("a small purple triangle at the top")."""
    return [_one(colour, shape, position, size) for colour, shape in HELD_OUT
            for size in (None, *SIZES) for position in (None, *POSITIONS)]


def pair_prompts() -> list[dict[str, Any]]:
    """The 120 two-object benchmark prompts, a balanced, fixed subset of all of them.

    Each of the 30 ordered pairs of distinct colours (first side, second side) comes in the 4
    variants layout (left–right, top–bottom) × mention order (first side first, or second), and
    gets the ordered pair of distinct shapes number (colour pair + variant) mod 6. So each layout
    and each order is 60 prompts, each colour and each shape is as often on either side, and the
    two objects always differ in colour and in shape (so a swap or a leak is unambiguous).
    Half the prompts give sizes: those where colour pair + order is even, small–large or
    large–small by the parity of colour pair // 2 + variant + order, so that every side of either
    layout holds as many small as large objects, in either order. Prompts with a HELD_OUT pair
    are marked.

    Each entry: {"prompt": "a blue square on the right and a red circle on the left",
    "layout": ("left", "right"), "objects": [{"colour", "shape", "size", "position",
    "held_out"}, …] (in the order mentioned), "held_out": True if either object is}.
    """
    colour_pairs = list(permutations(COLOURS, 2))
    size_orders = (("small", "large"), ("large", "small"))
    shape_pairs = list(permutations(SHAPES, 2))
    prompts = []
    for p, (c1, c2) in enumerate(colour_pairs):
        for v in range(4):
            layout, order = PAIRS[v % 2], v // 2
            s1, s2 = shape_pairs[(p + v) % len(shape_pairs)]
            sizes = (None, None) if (p + order) % 2 else size_orders[(p // 2 + v + order) % 2]
            objects = [_one(c, s, pos, size) for c, s, pos, size in zip((c1, c2), (s1, s2), layout, sizes)]
            if order:
                objects = objects[::-1]
            for o in objects:
                del o["prompt"]
            prompts.append({"prompt": " and ".join(phrase(o, with_size=o["size"] is not None, with_position=True)
                                                   for o in objects),
                            "layout": layout, "objects": objects, "held_out": any(o["held_out"] for o in objects)})
    return prompts
