"""A synthetic captioned dataset of coloured shapes (its analyser is `sdlearn.analyser`).

The tiny model learns from pictures like "a large red circle on the left": one (sometimes two)
flat coloured shapes on a plain neutral background, 64×64 RGB. Captions follow the grammar

    a [small|large] {red|green|blue|yellow|purple|orange} {circle|square|triangle}
      [on the left|on the right|at the top|at the bottom|in the center]

with variations ("red circle, left", "a picture of a blue square", "… and …"), and every sample
also carries its structured attributes, so alignment is *measured*: `analyse(image)` finds the
shape in any 64×64 picture (a generated one too) and says which colour, shape and position it has
(`sdlearn.analyser`).

    s = sample(7)                              # ShapeSample(image, caption, attributes)
    data = make_dataset(20_000, seed=0)        # uint8 (N, 3, 64, 64), captions, attributes
    grammar_prompts()                          # the 108 one-shape benchmark prompts

Everything is deterministic by seed: sample i of `make_dataset(n, seed)` is drawn from
`numpy.random.default_rng([seed, i])`, so it does not depend on n.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

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
# Two shapes go on opposite sides, so they never overlap.
PAIRS = (("left", "right"), ("top", "bottom"))


@dataclass(frozen=True)
class ShapeSample:
    """One picture: `image` uint8 (64, 64, 3), its caption, and what is in it.

    attributes = {"background": "white", "shapes": [{"colour", "shape", "size", "position",
    "cx", "cy", "extent"}, …]} with cx, cy, extent in pixels.
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
    return None


def draw(shapes: Sequence[dict[str, Any]], background: str | tuple[int, int, int],
         size: int = SIZE) -> np.ndarray:
    """Render shapes (dicts with colour, shape, cx, cy, extent in pixels) → uint8 (size, size, 3).

    Drawn at SUPERSAMPLE× the resolution and box-filtered down, so edges are anti-aliased.
    """
    bg = BACKGROUNDS[background] if isinstance(background, str) else background
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), bg)
    pen = ImageDraw.Draw(canvas)
    for s in shapes:
        rgb = COLOURS[s["colour"]] if isinstance(s["colour"], str) else s["colour"]
        cx, cy, e = s["cx"] * k, s["cy"] * k, s["extent"] * k
        corners = _polygon(s["shape"], cx, cy, e)
        if corners is None:
            pen.ellipse([cx - e / 2, cy - e / 2, cx + e / 2, cy + e / 2], fill=rgb)
        else:
            pen.polygon(corners, fill=rgb)
    return np.array(canvas.resize((size, size), Image.BOX))


# ----------------------------------------------------------------------------------- captions

def phrase(s: dict[str, Any], *, with_size: bool, with_position: bool) -> str:
    """'a large red circle on the left' — the grammar's noun phrase for one shape."""
    words = [s["size"]] if with_size else []
    words += [s["colour"], s["shape"]]
    if with_position:
        words.append(POSITION_PHRASES[s["position"]])
    return "a " + " ".join(words)


def caption(shapes: Sequence[dict[str, Any]], rng: np.random.Generator) -> str:
    """A caption for one or two shapes, with the grammar's variations.

    Single shape (probabilities): 70 % the grammar with optional size and position,
    10 % "a picture of …", 10 % terse "red circle, left", 10 % bare "red circle".
    Two shapes: "… and …", always with positions (otherwise the caption is ambiguous).
    """
    if len(shapes) == 2:
        return " and ".join(phrase(s, with_size=rng.random() < 0.4, with_position=True) for s in shapes)
    s = shapes[0]
    style = rng.random()
    if style < 0.8:
        text = phrase(s, with_size=rng.random() < 0.4, with_position=rng.random() < 0.75)
        return "a picture of " + text if style >= 0.7 else text
    if style < 0.9:
        return f"{s['colour']} {s['shape']}, {s['position']}"
    return f"{s['colour']} {s['shape']}"


_WORD = {w: ("colour", w) for w in COLOURS} | {w: ("shape", w) for w in SHAPES} \
    | {w: ("size", w) for w in SIZES} | {w: ("position", w) for w in POSITIONS} | {"centre": ("position", "center")}


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """What a caption asks for, one dict per shape ("… and …"), None where it says nothing.

    "a large red circle on the left" → [{"colour": "red", "shape": "circle", "size": "large",
    "position": "left"}]. Understands every caption `caption()` writes and the grammar prompts.
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

def _shape(rng: np.random.Generator, position: str) -> dict[str, Any]:
    size = rng.choice(list(SIZES))
    x, y = POSITIONS[position]
    jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    extent = SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    return {"colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)), "size": str(size),
            "position": position, "cx": round(float((x + jitter[0]) * SIZE), 3),
            "cy": round(float((y + jitter[1]) * SIZE), 3), "extent": round(float(extent * SIZE), 3)}


def _overlap(a: dict[str, Any], b: dict[str, Any], gap: float = 3.0) -> bool:
    reach = (a["extent"] + b["extent"]) / 2 + gap
    return abs(a["cx"] - b["cx"]) < reach and abs(a["cy"] - b["cy"]) < reach


def _sample(rng: np.random.Generator, two_shapes: float) -> ShapeSample:
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < two_shapes:
        pair = PAIRS[rng.integers(len(PAIRS))]
        if rng.random() < 0.5:
            pair = pair[::-1]
        while True:  # redraw sizes and jitter until the two do not touch (rarely more than once)
            shapes = [_shape(rng, p) for p in pair]
            if not _overlap(*shapes):
                break
    else:
        shapes = [_shape(rng, str(rng.choice(list(POSITIONS))))]
    return ShapeSample(draw(shapes, background), caption(shapes, rng),
                       {"background": background, "shapes": shapes})


def sample(seed: int, index: int = 0, *, two_shapes: float = 0.0) -> ShapeSample:
    """The picture drawn from `default_rng([seed, index])`; `two_shapes` = P(two shapes)."""
    return _sample(np.random.default_rng([seed, index]), two_shapes)


_C, _S = "{" + "|".join(COLOURS) + "}", "{" + "|".join(SHAPES) + "}"
GRAMMAR = (
    f"a [small|large] {_C} {_S} [" + "|".join(POSITION_PHRASES.values()) + "]",
    "a picture of <the above>",
    f"{_C} {_S}[, " + "{" + "|".join(POSITIONS) + "}]",
    "<a shape on the left> and <a shape on the right>   (or at the top and at the bottom)",
)


def vocabulary() -> list[str]:
    """Every word a caption can hold (what the tiny model has seen), sorted."""
    words = {"a", "picture", "of", "and", *COLOURS, *SHAPES, *SIZES, *POSITIONS}
    for text in POSITION_PHRASES.values():
        words.update(text.split())
    return sorted(words)


DATASET_VERSION = 1  # bump when drawing or captions change, so old caches are not reused


def make_dataset(n: int, seed: int = 0, *, two_shapes: float = 0.1,
                 cache_dir: str | Path | None = None) -> ShapeDataset:
    """n samples → ShapeDataset(images uint8 (n, 3, 64, 64), captions, attributes).

    About 0.5 ms per image; with `cache_dir` the result is stored once as a compressed .npz
    (a few MB for 20,000 images) and read back on later calls with the same arguments.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"shapes-v{DATASET_VERSION}-n{n}-seed{seed}-two{two_shapes:g}.npz"
        if path.exists():
            with np.load(path) as f:
                return ShapeDataset(torch.from_numpy(f["images"]), json.loads(str(f["captions"])),
                                    json.loads(str(f["attributes"])))
    samples = [sample(seed, i, two_shapes=two_shapes) for i in range(n)]
    images = np.stack([s.image for s in samples]).transpose(0, 3, 1, 2).copy()
    data = ShapeDataset(torch.from_numpy(images), [s.caption for s in samples], [s.attributes for s in samples])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=images, captions=json.dumps(data.captions),
                            attributes=json.dumps(data.attributes))
        tmp.replace(path)
    return data


def grammar_prompts() -> list[dict[str, str | None]]:
    """The 108 benchmark prompts: 6 colours × 3 shapes × (no position + 5 positions).

    Each entry: {"prompt": "a red circle on the left", "colour": "red", "shape": "circle",
    "position": "left"} (position None for "a red circle").
    """
    prompts = []
    for colour in COLOURS:
        for shape in SHAPES:
            for position in (None, *POSITIONS):
                text = f"a {colour} {shape}" + (f" {POSITION_PHRASES[position]}" if position else "")
                prompts.append({"prompt": text, "colour": colour, "shape": shape, "position": position})
    return prompts
