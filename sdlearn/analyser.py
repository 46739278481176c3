"""The analyser: reads back from any picture which shapes it shows, and scores it against a prompt.

The tiny model is judged by it, so alignment is measured, not eyeballed:

    analyse(image)                              # the largest shape: {"colour": "red", "shape": "circle", …}
    analyse_objects(image)                      # every shape found, largest first
    read_scene(image, 2)                        # the 2 largest shapes, and the stray blobs
    read_pair(image, ("left", "right"))         # (left shape, right shape, stray blobs)
    read_background(image)                      # "black": the nearest of shapes.BACKGROUNDS
    score_alignment(images, grammar_prompts())  # one object per prompt: colour, shape, position, stray, circle
    score_pairs(images, pair_prompts())         # two objects: both right, each attribute, swaps, leaks
    alignment(pipe), pair_alignment(pipe)       # generate a prompt set and score it

How a picture is read (`find_blobs`):
1. background = the median colour of the 2-pixel border; dist = each pixel's RGB distance from it;
   floor = MIN_CONTRAST, or NOISE_FACTOR × the pixel noise seen along the edge if that is more;
2. a pixel is *in a blob* if dist > floor and it is not in a *valley* (`_valleys`):
   along a row, column or diagonal, both sides within VALLEY_RADIUS hold a pixel more than
   VALLEY_RATIO times farther from the background (in that pixel's colour direction). So two
   shapes that a blur joins stay two blobs, while the soft, one-sided edge of a shape stays its own;
3. a blob is a 4-connected region of such pixels; its own contrast is the median dist of its
   most contrasted half; its outline (bounding box, area) is where dist exceeds half of that.
   Blobs of fewer than STRAY_PIXELS pixels are pixel noise; a blob of at least MIN_PIXELS may be
   a shape;
4. per blob: colour = palette colour nearest to the median of its most contrasted half;
   coverage = how far each nearby pixel is from the background towards that colour (0–1, so a
   neighbour of another colour does not count); shape from that coverage (`shape_features`);
   position = anchor nearest to its bounding-box centre; size = small or large by its side.

**Stray blobs.** When a prompt asks for k objects (1 or 2), the k largest blobs of at least
MIN_PIXELS are the objects; every other blob of at least STRAY_PIXELS is a stray blob: a speck, a
fragment of a broken shape, a third shape. A picture has strays or it has not (`"stray"` scores).

It knows the dataset's palette, shapes and positions (`sdlearn.shapes`), nothing else.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .images import to_uint8
from .shapes import BACKGROUNDS, COLOURS, PAIRS, POSITIONS, SIZES, grammar_prompts, pair_prompts

MIN_CONTRAST = 40.0   # RGB distance from the background below which a pixel is background
NOISE_FACTOR = 2.0    # … or this many times the pixel noise (`_pixel_noise`), if that is more
VALLEY_RADIUS = 4     # a valley between two blobs is found if they are this close on both sides
VALLEY_RATIO = 1.5    # … and this many times farther from the background than the valley
MIN_PIXELS = 12       # smaller blobs are never taken for a shape
STRAY_PIXELS = 4      # smaller blobs are pixel noise, not even stray blobs
TERRITORY = 3         # pixels around a blob whose coverage counts towards its shape
TRIANGLE_SKEWNESS = -0.25  # vertical skewness of mass: apex-up triangle −0.57; circle, square 0
SQUARE_FILL = 0.86         # share of the bounding box covered: square 1, circle 0.785
# What a circle must look like to be *read as a circle* (`looks_round`), not only "not a
# triangle, not a square": the class any smudge falls into.
# Dataset circles, clean, blurred, noisy or low-res, measure fill 0.76–0.82, aspect 0.94–1.07,
# |skewness| < 0.05 both ways.
ROUND_FILL = 0.72          # circle π/4 ≈ 0.785; less is a ragged or hollow blob
ROUND_ASPECT = 1.15        # soft width / height at most this (or its inverse)
ROUND_SKEWNESS = 0.1       # |skewness| of mass over rows and over columns below this
# The star (`sdlearn.shapes.EXTRA_SHAPES`, not in the grammar): five-fold angular harmonic of the
# mass (`angular_harmonic`). Drawn stars 0.54–0.61; the tiny VAE's reconstructions of large stars
# 0.25–0.41; triangles 0.12–0.16 (their three-fold one is larger, 0.50–0.56); circles and
# squares below 0.03, clean or through the VAE.
STAR_HARMONIC = 0.2


# ----------------------------------------------------------------------------------- colour

def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB 0–255 (…, 3) → CIE L*a*b* (D65): a space where distances match perceived colour."""
    c = rgb / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_NAMES = list(COLOURS)
_PALETTE_LAB = _lab(np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64))
_LAB_WEIGHT = np.array([0.5, 1.0, 1.0])  # lightness counts half: hue and chroma name a colour


def nearest_colour(rgb) -> tuple[str, float]:
    """The palette colour nearest to an RGB triple in weighted L*a*b*, and that distance."""
    d = np.linalg.norm((_lab(np.asarray(rgb, dtype=np.float64)) - _PALETTE_LAB) * _LAB_WEIGHT, axis=-1)
    i = int(d.argmin())
    return _PALETTE_NAMES[i], float(d[i])


# ----------------------------------------------------------------------------------- pixel neighbourhoods

def _neighbours(a: np.ndarray) -> list[np.ndarray]:
    """The 9 shifted copies of a 2-D array over a 3×3 neighbourhood (0 outside)."""
    return [_shifted(a, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = a[y + dy, x + dx] over the first two axes, 0 where that falls outside."""
    h, w = a.shape[:2]
    out = np.zeros_like(a)
    out[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = a[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
    return out


def _valleys(diff: np.ndarray, dist: np.ndarray, r: int, floor: float) -> np.ndarray:
    """Pixels in the dip between two blobs: along a row, a column or a diagonal, *both* sides
    within r hold a foreground pixel (dist > floor) more than VALLEY_RATIO times farther
    from the background than this pixel reaches in that pixel's colour direction. (Measured in
    its direction, so that between a dim shape and a bright one, which is no dip in plain
    distance, there is one in the dim shape's colour.) A convex shape, blurred or not, has
    none: its profile along any line rises once and falls once.

    diff (H, W, 3) = pixel − background, dist (H, W) its length → bool (H, W)."""
    valley = np.zeros(dist.shape, bool)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        dips = []
        for sign in (1, -1):
            best, towards = np.zeros_like(dist), np.zeros_like(diff)
            for k in range(1, r + 1):
                d, v = _shifted(dist, sign * k * dy, sign * k * dx), _shifted(diff, sign * k * dy, sign * k * dx)
                better = d > best
                best, towards = np.where(better, d, best), np.where(better[..., None], v, towards)
            along = (diff * towards).sum(-1) / np.maximum(best, 1e-6)   # this pixel, measured towards it
            dips.append((best > floor) & (best > VALLEY_RATIO * along))
        valley |= dips[0] & dips[1]
    return valley


def _grow(labels: np.ndarray, r: int) -> np.ndarray:
    """Labels grown r pixels into unlabelled (0) pixels, one square ring at a time; a pixel
    reached by two labels at once takes the larger. Each blob's territory for its coverage."""
    for _ in range(r):
        labels = np.where(labels > 0, labels, np.maximum.reduce(_neighbours(labels)))
    return labels


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean mask → int labels (0 = background).

    Every pixel starts with its own label and repeatedly takes the largest label among its
    neighbours in the mask; when nothing changes, each component carries one label.
    """
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        grown = labels.copy()
        grown[1:] = np.maximum(grown[1:], labels[:-1])
        grown[:-1] = np.maximum(grown[:-1], labels[1:])
        grown[:, 1:] = np.maximum(grown[:, 1:], labels[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], labels[:, 1:])
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _box3(a: np.ndarray) -> np.ndarray:
    """3×3 mean filter (edges averaged over the pixels that exist)."""
    return sum(_neighbours(a)) / sum(_neighbours(np.ones_like(a)))


# ----------------------------------------------------------------------------------- shape

def _skewness(mass: np.ndarray) -> float:
    """Skewness of a 1-D mass distribution over its indices (0 when symmetric)."""
    y = np.arange(len(mass)) + 0.5
    mean = (mass * y).sum() / mass.sum()
    var = (mass * (y - mean) ** 2).sum() / mass.sum()
    return float((mass * (y - mean) ** 3).sum() / mass.sum() / max(var, 1e-6) ** 1.5)


def _soft_sides(weight: np.ndarray) -> tuple[float, float]:
    """Soft width and height: Σ_x max_y coverage and Σ_y max_x (after a 3×3 mean against noise)."""
    smooth = _box3(weight)
    return float(smooth.max(axis=0).sum()), float(smooth.max(axis=1).sum())


def shape_features(weight: np.ndarray) -> tuple[float, float]:
    """Two numbers that tell circle, square and apex-up triangle apart, blur or not.

    `weight` is the shape's soft coverage (0–1, 0 elsewhere).
      fill = mass / (soft width · soft height): the share of its bounding box the shape
        covers: square 1, circle π/4 ≈ 0.785, triangle ½. Mass, and widths read as
        Σ_x max_y coverage (after a 3×3 mean against noise), survive a symmetric blur.
      skewness of the mass over rows: an apex-up triangle's rows hold mass ∝ y, skewness
        −0.57; circle and square 0. Blur keeps its sign and most of it, while it rounds
        every corner away, so a small blurred triangle is still told apart.
    """
    width, height = _soft_sides(weight)
    fill = weight.sum() / max(width * height, 1e-6)
    return float(fill), _skewness(weight.sum(axis=1))


def classify_shape(fill: float, skewness: float) -> str:
    """Triangle if top-light, else square if it fills its box, else circle."""
    if skewness < TRIANGLE_SKEWNESS:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def angular_harmonic(weight: np.ndarray, k: int) -> float:
    """How k-fold the shape is: c_k = |Σ w r² e^{ikθ}| / Σ w r², with (r, θ) of each pixel around
    the centre of mass and w its coverage. A disc gives 0 for every k; a shape with k points
    (a five-pointed star, k = 5) puts its far mass at k angles 2π/k apart, where e^{ikθ} agrees,
    so c_k is large; the r² weight counts the points more than the core. Turning the shape
    leaves |c_k| unchanged."""
    ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]] + 0.5
    mass = max(float(weight.sum()), 1e-6)
    dx, dy = xs - (weight * xs).sum() / mass, ys - (weight * ys).sum() / mass
    w = weight * (dx ** 2 + dy ** 2)
    return float(abs((w * np.exp(1j * k * np.arctan2(dy, dx))).sum()) / max(float(w.sum()), 1e-6))


def looks_like_star(obj: dict[str, Any]) -> bool:
    """A five-pointed star: a strong five-fold harmonic, stronger than the three-fold one (which
    an apex-up triangle's shape gives it, with some five-fold too)."""
    return obj["points5"] > STAR_HARMONIC and obj["points5"] > obj["points3"]


def looks_round(obj: dict[str, Any]) -> bool:
    """Is a found shape positively a circle? `classify_shape` calls whatever is neither
    top-light nor box-filling a circle, a ragged smudge too; this asks for a circle's look:
    fill between ROUND_FILL and SQUARE_FILL, as wide as high (within ROUND_ASPECT), and
    symmetric top–bottom and left–right (|skewness| < ROUND_SKEWNESS both ways)."""
    return (obj["shape"] == "circle" and ROUND_FILL <= obj["fill"] <= SQUARE_FILL
            and 1 / ROUND_ASPECT <= obj["aspect"] <= ROUND_ASPECT
            and abs(obj["skewness"]) < ROUND_SKEWNESS and abs(obj["skewness_x"]) < ROUND_SKEWNESS)


# ----------------------------------------------------------------------------------- reading a picture

def _pixel_noise(a: np.ndarray) -> float:
    """Median RGB distance between neighbouring pixels along the picture's edge: about 2.2 σ for
    noise of σ per channel, ~0 on a flat or smoothly shaded background (a gradient, a haze).
    Twice it is about 4.4 σ, a distance that noise alone rarely reaches (1 pixel in 10,000)."""
    edges = (a[0], a[-1], a[:, 0], a[:, -1])
    return float(np.median(np.concatenate([np.linalg.norm(np.diff(e, axis=0), axis=-1) for e in edges])))


def _border_median(a: np.ndarray) -> np.ndarray:
    """The median RGB (3,) of a picture's 2-pixel border: its background colour (step 1)."""
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def read_background(image) -> str:
    """Which of the dataset's BACKGROUNDS a picture shows: the one nearest (RGB distance) to the
    median colour of its 2-pixel border. Captions never name it; textual inversion can (ti_train)."""
    bg = _border_median(to_uint8(image).astype(np.float32))
    return min(BACKGROUNDS, key=lambda name: float(np.linalg.norm(bg - np.array(BACKGROUNDS[name]))))


def _nearest_position(x: float, y: float) -> str:
    """The anchor nearest to (x, y), both as fractions of the picture's side."""
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def _against_background(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Step 1 of reading a picture a (H, W, 3) float: the background colour (median of the 2-pixel
    border), each pixel's difference from it (H, W, 3) and distance (H, W), and the floor below
    which a distance is background."""
    bg = _border_median(a)
    diff = a - bg
    return bg, diff, np.linalg.norm(diff, axis=-1), max(MIN_CONTRAST, NOISE_FACTOR * _pixel_noise(a))


def find_blobs(image) -> list[dict[str, Any]]:
    """Every blob of at least STRAY_PIXELS in a picture, largest first (the steps: module docstring).

    Each entry: colour, shape, position, size, cx, cy, extent (px), x, y (centre as fractions of
    the width and height), area (px), fill, skewness, skewness_x, aspect, round (`looks_round`),
    colour_distance (weighted L*a*b* distance to the palette colour: small = a clean colour),
    points3, points5 (`angular_harmonic`) and star (`looks_like_star`; "shape" stays one of the
    grammar's three: a star is an extra reading, for textual inversion's new word).
    """
    a = to_uint8(image).astype(np.float32)
    h, w, _ = a.shape
    bg, diff, dist, floor = _against_background(a)
    labels = _components((dist > floor) & ~_valleys(diff, dist, VALLEY_RADIUS, floor))
    territory = _grow(labels, TERRITORY)
    threshold = (SIZES["small"] + SIZES["large"]) / 2 * max(h, w)
    found = []
    for label in np.unique(labels[labels > 0]):
        region = labels == label
        core = region & (dist >= np.median(dist[region]))
        blob = region & (dist > 0.5 * np.median(dist[core]))      # the outline: half its own contrast
        if blob.sum() < STRAY_PIXELS:
            continue
        rgb = np.median(a[core], axis=0)
        colour, colour_distance = nearest_colour(rgb)
        towards = rgb - bg
        coverage = diff @ towards / max(float(towards @ towards), 1e-6)
        weight = np.where(territory == label, np.clip((coverage - 0.25) / 0.5, 0, 1), 0.0)
        fill, skewness = shape_features(weight)
        width, height = _soft_sides(weight)
        ys, xs = np.nonzero(blob)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        extent = float(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
        obj = {"colour": colour, "shape": classify_shape(fill, skewness), "position": _nearest_position(cx / w, cy / h),
               "size": "large" if extent > threshold else "small", "cx": float(cx), "cy": float(cy), "extent": extent,
               "x": float(cx / w), "y": float(cy / h), "area": int(blob.sum()), "fill": fill, "skewness": skewness,
               "skewness_x": _skewness(weight.sum(axis=0)), "aspect": width / max(height, 1e-6),
               "colour_distance": colour_distance,
               "points3": angular_harmonic(weight, 3), "points5": angular_harmonic(weight, 5)}
        found.append(obj | {"round": looks_round(obj), "star": looks_like_star(obj)})
    return sorted(found, key=lambda o: -o["area"])


def analyse_objects(image) -> list[dict[str, Any]]:
    """Every shape found in an image (blobs of at least MIN_PIXELS), largest first; entries as
    `find_blobs`."""
    return [b for b in find_blobs(image) if b["area"] >= MIN_PIXELS]


def analyse(image) -> dict[str, Any]:
    """The largest shape in an image: {"colour", "shape", "position", "size", …, "found": True},
    or {"colour": None, "shape": None, "position": None, "size": None, "found": False}."""
    objects = analyse_objects(image)
    if not objects:
        return {"colour": None, "shape": None, "position": None, "size": None, "found": False}
    return objects[0] | {"found": True}


def read_scene(image, count: int = 1) -> dict[str, list[dict[str, Any]]]:
    """{"objects": the `count` largest shapes (fewer if fewer are found), "strays": every other
    blob of at least STRAY_PIXELS}: the stray-blob definition of the module docstring."""
    blobs = find_blobs(image)
    objects = [b for b in blobs if b["area"] >= MIN_PIXELS][:count]
    return {"objects": objects, "strays": [b for b in blobs if not any(b is o for o in objects)]}


def _sides(layout: Sequence[str]) -> tuple[str, str, str]:
    """("right", "left") → ("left", "right", "x"): the sides in reading order and the axis between them."""
    for first, second in PAIRS:
        if set(layout) == {first, second}:
            return first, second, "x" if first == "left" else "y"
    raise ValueError(f"a two-object layout is one of {PAIRS} (either order); found {tuple(layout)}")


def read_pair(image, layout: Sequence[str] = ("left", "right")) -> tuple[dict | None, dict | None, list[dict]]:
    """(shape on the first side, shape on the second side, stray blobs) for a two-object layout,
    ("left", "right") or ("top", "bottom").

    The two largest shapes are ordered along the layout's axis; each gets "side": the half of
    the picture its centre is in (so both can be on one side). A single shape found goes to the
    side it is on, and the other is None.
    """
    first, second, axis = _sides(layout)
    scene = read_scene(image, 2)
    objects = [o | {"side": first if o[axis] < 0.5 else second} for o in sorted(scene["objects"], key=lambda o: o[axis])]
    if len(objects) == 1:
        objects = objects + [None] if objects[0]["side"] == first else [None] + objects
    objects += [None] * (2 - len(objects))
    return objects[0], objects[1], scene["strays"]


# ----------------------------------------------------------------------------------- scoring

def _rate(hits: list) -> float:
    """Mean of the booleans that apply (None = does not apply); NaN when none does."""
    hits = [h for h in hits if h is not None]
    return float(np.mean(hits)) if hits else float("nan")


def score_alignment(images: Sequence, expected: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How often each image's largest shape is what its one-object prompt asked for.

    `expected[i]` holds "colour", "shape", "position" and optionally "size" (None = not asked,
    not counted), e.g. the entries of `grammar_prompts()`. Returns fractions of images:
    "colour", "shape", "position", "size" (only when some prompt asks for a size), "found" (a shape
    at all), "stray" (has stray blobs: lower is better), and "circle": of the images asked for a
    circle, those whose shape is read as a circle *and* `looks_round` (NaN if none asked).
    """
    if len(images) != len(expected):
        raise ValueError(f"got {len(images)} images for {len(expected)} expectations; pass one each")
    keys = ("colour", "shape", "position") + (("size",) if any(e.get("size") for e in expected) else ())
    hits: dict[str, list] = {k: [] for k in keys + ("found", "stray", "circle")}
    for image, want in zip(images, expected):
        scene = read_scene(image, 1)
        got = scene["objects"][0] if scene["objects"] else dict.fromkeys(keys)
        for key in keys:
            hits[key].append(got[key] == want[key] if want.get(key) is not None else None)
        hits["found"].append(bool(scene["objects"]))
        hits["stray"].append(bool(scene["strays"]))
        hits["circle"].append(bool(got.get("round")) if want.get("shape") == "circle" else None)
    return {k: _rate(v) for k, v in hits.items()}


def _asked_pair(expected) -> list[dict[str, Any]]:
    """The two asked objects from a `pair_prompts()` entry, a dataset sample's attributes, or a list."""
    if isinstance(expected, dict):
        expected = expected.get("objects", expected.get("shapes"))
    if expected is None or len(expected) != 2:
        raise ValueError("a two-object expectation is a pair_prompts() entry, a sample's attributes "
                         f"(two 'shapes') or a list of two objects; found {expected!r}")
    return list(expected)


def _agree(drawn: dict | None, asked: dict) -> int:
    """How many of colour and shape a drawn shape shares with an asked object (0 if none drawn)."""
    return 0 if drawn is None else (drawn["colour"] == asked["colour"]) + (drawn["shape"] == asked["shape"])


def score_pair(image, expected) -> dict[str, Any]:
    """One picture against a two-object prompt (`pair_prompts()` entry, or two objects with
    colour, shape, position and optionally size).

    `read_pair` finds a shape on each side. Each asked object is paired with one of them: same
    sides, or crossed if more colours and shapes agree that way (so a red circle drawn on the
    wrong side is still the red circle). Returns:
      "colour", "shape", "position", "size": one boolean per asked object (left/top first): its
        shape has the asked colour / shape / lies in the asked half / has the asked size (size
        only for the objects that ask for one);
      "both": both objects right in colour, shape and position; "found": two shapes found;
      "swapped": both drawn right (colour and shape) but each where the other was asked;
      "colour_swap": each side has its asked shape but the other object's colour (binding);
      "colour_leak" / "shape_leak": both drawn with the same one of the two asked colours / shapes;
      (these three are None when the asked objects share that attribute)
      "stray": stray blobs besides the two shapes; "read": the two shapes on the sides (or None).
    """
    asked = _asked_pair(expected)
    first, second, _ = _sides([o["position"] for o in asked])
    e = sorted(asked, key=lambda o: o["position"] != first)
    *d, strays = read_pair(image, (first, second))
    found = d[0] is not None and d[1] is not None
    crossed = _agree(d[1], e[0]) + _agree(d[0], e[1]) > _agree(d[0], e[0]) + _agree(d[1], e[1])
    paired = d[::-1] if crossed else d
    result: dict[str, Any] = {k: [g is not None and g[k] == w[k] for g, w in zip(paired, e)] for k in ("colour", "shape")}
    result["position"] = [g is not None and g["side"] == w["position"] for g, w in zip(paired, e)]
    result["size"] = [g is not None and g["size"] == w["size"] for g, w in zip(paired, e) if w.get("size")]
    result["both"] = all(all(result[k]) for k in ("colour", "shape", "position"))
    result["found"] = found
    colours_differ, shapes_differ = e[0]["colour"] != e[1]["colour"], e[0]["shape"] != e[1]["shape"]
    result["swapped"] = (found and crossed and all(result["colour"]) and all(result["shape"])) \
        if colours_differ or shapes_differ else None
    result["colour_swap"] = (found and all(g["shape"] == w["shape"] for g, w in zip(d, e))
                             and (d[0]["colour"], d[1]["colour"]) == (e[1]["colour"], e[0]["colour"])) \
        if colours_differ else None
    result["colour_leak"] = (found and d[0]["colour"] == d[1]["colour"] in (e[0]["colour"], e[1]["colour"])) \
        if colours_differ else None
    result["shape_leak"] = (found and d[0]["shape"] == d[1]["shape"] in (e[0]["shape"], e[1]["shape"])) \
        if shapes_differ else None
    result["stray"] = bool(strays)
    result["read"] = tuple(d)
    return result


PAIR_SCORES = ("both", "colour", "shape", "position", "size", "found", "swapped", "colour_swap", "colour_leak",
               "shape_leak", "stray")


def score_pairs(images: Sequence, expected: Sequence) -> dict[str, float]:
    """`score_pair` over many pictures → fractions: "colour", "shape", "position", "size" of
    objects (size: of those that ask for one); the rest of pictures (swaps and leaks: of those
    where they can happen). Lower is better for swapped, colour_swap, the leaks and stray."""
    if len(images) != len(expected):
        raise ValueError(f"got {len(images)} images for {len(expected)} expectations; pass one each")
    hits: dict[str, list] = {k: [] for k in PAIR_SCORES}
    for image, want in zip(images, expected):
        result = score_pair(image, want)
        for key in PAIR_SCORES:
            value = result[key]
            hits[key] += value if isinstance(value, list) else [value]
    return {k: _rate(v) for k, v in hits.items()}


# ----------------------------------------------------------------------------------- a pipeline, scored

def _generate(pipe, prompts, guidance, steps, sampler, seed) -> torch.Tensor:
    """Every prompt once, as one batch from `seed` (each gets its own starting noise)."""
    return pipe.generate([p["prompt"] for p in prompts], guidance=guidance, steps=steps, sampler=sampler,
                         seed=seed, progress=False).pixels


def alignment(pipe, *, guidance: float = 5.0, steps: int | None = None, sampler: str | None = None,
              seed: int = 0, prompts: Sequence[dict[str, Any]] | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """How well a pipeline draws what it is asked: each grammar prompt once, scored by the analyser.

    All prompts run as one batch from `seed`; steps and sampler default to the pipeline's.
    Returns (scores as `score_alignment`, pixels (N, 3, H, W)).
    """
    prompts = grammar_prompts() if prompts is None else list(prompts)
    pixels = _generate(pipe, prompts, guidance, steps, sampler, seed)
    return score_alignment(list(pixels), prompts), pixels


def pair_alignment(pipe, *, guidance: float = 5.0, steps: int | None = None, sampler: str | None = None,
                   seed: int = 0, prompts: Sequence[dict[str, Any]] | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """`alignment` for two-object prompts (default `pair_prompts()`): (scores as `score_pairs`, pixels)."""
    prompts = pair_prompts() if prompts is None else list(prompts)
    pixels = _generate(pipe, prompts, guidance, steps, sampler, seed)
    return score_pairs(list(pixels), prompts), pixels


# ----------------------------------------------------------------------------------- outlined or filled

OUTLINED = 0.2   # hollowness above which a shape counts as drawn in outline (filled ≈ 0, outlines 0.3–0.6)


def hollowness(image) -> float | None:
    """How hollow the largest shape is: the share of the area its outline encloses that is not
    painted. A filled shape ≈ 0; an outline of `shapes.draw(…, style="outline")` 0.3–0.6 (triangles,
    whose inside is smallest, least). None if the picture shows no shape.

    The shape's pixels are those of the largest foreground component (step 1–3 of the module
    docstring, without valleys) with more than half its own contrast; its holes are the other
    pixels that no path of such other pixels connects to the picture's edge."""
    a = to_uint8(image).astype(np.float32)
    _, _, dist, floor = _against_background(a)
    labels = _components(dist > floor)
    if not labels.any():
        return None
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    region = labels == ids[counts.argmax()]
    if region.sum() < MIN_PIXELS:
        return None
    core = region & (dist >= np.median(dist[region]))
    painted = region & (dist > 0.5 * np.median(dist[core]))
    rest = _components(~painted)
    edge = np.unique(np.concatenate([rest[0], rest[-1], rest[:, 0], rest[:, -1]]))
    holes = (rest > 0) & ~np.isin(rest, edge)
    return float(holes.sum() / (holes.sum() + painted.sum()))


def outlined(image) -> bool:
    """Is the largest shape drawn in outline (hollowness > OUTLINED)?"""
    h = hollowness(image)
    return h is not None and h > OUTLINED
