"""The analyser: reads back from any picture which shapes it shows, their colours and positions.

The tiny model is judged by it, so alignment is measured, not eyeballed:

    analyse(image)                              # the largest shape: {"colour": "red", "shape": "circle", …}
    analyse_objects(image)                      # every shape found, largest first
    score_alignment(images, grammar_prompts())  # fraction of images that show what was asked
    alignment(pipe)                             # generate every grammar prompt and score it

It knows the dataset's palette, shapes and positions (`sdlearn.shapes`), nothing else.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .images import to_uint8
from .shapes import COLOURS, POSITIONS, SIZES, grammar_prompts

MIN_CONTRAST = 40.0   # RGB distance from the background below which a pixel is background
MIN_PIXELS = 12       # smaller blobs are noise, not shapes
TRIANGLE_SKEWNESS = -0.25  # vertical skewness of mass: apex-up triangle −0.57; circle, square 0
SQUARE_FILL = 0.86         # share of the bounding box covered: square 1, circle 0.785


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


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Grow a boolean mask by r pixels (a square neighbourhood)."""
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
        out = grown
    return out


def _box3(a: np.ndarray) -> np.ndarray:
    """3×3 mean filter (edges averaged over the pixels that exist)."""
    padded = np.pad(a, 1)
    ones = np.pad(np.ones_like(a), 1)
    total = sum(padded[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3))
    count = sum(ones[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3))
    return total / count


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
    smooth = _box3(weight)
    fill = weight.sum() / max(smooth.max(axis=0).sum() * smooth.max(axis=1).sum(), 1e-6)
    rows = weight.sum(axis=1)
    y = np.arange(len(rows)) + 0.5
    mean = (rows * y).sum() / rows.sum()
    var = (rows * (y - mean) ** 2).sum() / rows.sum()
    skewness = (rows * (y - mean) ** 3).sum() / rows.sum() / max(var, 1e-6) ** 1.5
    return float(fill), float(skewness)


def classify_shape(fill: float, skewness: float) -> str:
    """Triangle if top-light, else square if it fills its box, else circle."""
    if skewness < TRIANGLE_SKEWNESS:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def _nearest_position(cx: float, cy: float, size: int) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] * size - cx) ** 2 + (POSITIONS[p][1] * size - cy) ** 2)


def analyse_objects(image) -> list[dict[str, Any]]:
    """Every shape found in an image, largest first.

    1. background = the median colour of the 2-pixel border;
    2. each 4-connected region of pixels farther than MIN_CONTRAST from it, of ≥ MIN_PIXELS
       pixels, is one shape; its edge is where the distance crosses half the shape's own contrast
       (so a dim shape next to a bright one keeps its true outline);
       colour = nearest palette colour to the median of its most contrasted half (its core);
       shape = from its soft coverage: skewness over rows (triangle) and fill of its box
       (square vs circle), see `shape_features`;
       position = anchor nearest to its bounding-box centre; size = small or large by its side.
    Each entry: colour, shape, position, size, cx, cy, extent (px), area (px), fill, skewness,
    colour_distance (weighted L*a*b* distance to the palette colour: small = a clean colour).
    """
    a = to_uint8(image).astype(np.float32)
    h, w, _ = a.shape
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(a - bg, axis=-1)
    labels = _components(dist > MIN_CONTRAST)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    found = []
    threshold = (SIZES["small"] + SIZES["large"]) / 2 * h
    for label in ids[areas >= MIN_PIXELS]:
        region = labels == label
        contrast = float(np.median(dist[region & (dist >= np.median(dist[region]))]))
        blob = region & (dist > 0.5 * contrast)          # edges at half of this shape's own contrast
        if blob.sum() < MIN_PIXELS:
            continue
        core = blob & (dist >= np.median(dist[blob]))
        colour, colour_distance = nearest_colour(np.median(a[core], axis=0))
        near = _dilate(blob, 3) & ~(labels > 0) | region   # around the blob, other blobs left out
        weight = np.where(near, np.clip((dist - 0.25 * contrast) / (0.5 * contrast), 0, 1), 0.0)
        fill, skewness = shape_features(weight)
        ys, xs = np.nonzero(blob)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        extent = float(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
        found.append({"colour": colour, "shape": classify_shape(fill, skewness), "position": _nearest_position(cx, cy, h),
                      "size": "large" if extent > threshold else "small", "cx": float(cx), "cy": float(cy),
                      "extent": extent, "area": int(blob.sum()), "fill": fill, "skewness": skewness,
                      "colour_distance": colour_distance})
    return sorted(found, key=lambda o: -o["area"])


def analyse(image) -> dict[str, Any]:
    """The largest shape in an image: {"colour", "shape", "position", "size", …, "found": True},
    or {"colour": None, "shape": None, "position": None, "size": None, "found": False}."""
    objects = analyse_objects(image)
    if not objects:
        return {"colour": None, "shape": None, "position": None, "size": None, "found": False}
    return objects[0] | {"found": True}


def score_alignment(images: Sequence, expected: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fraction of images whose largest shape has the expected colour, shape and position.

    `expected[i]` holds "colour", "shape", "position" (None = not asked, not counted), e.g. the
    entries of `grammar_prompts()`. Returns {"colour": …, "shape": …, "position": …, "found": …}.
    """
    if len(images) != len(expected):
        raise ValueError(f"got {len(images)} images for {len(expected)} expectations; pass one each")
    hits = {k: [] for k in ("colour", "shape", "position")}
    found = 0
    for image, want in zip(images, expected):
        got = analyse(image)
        found += got["found"]
        for key in hits:
            if want.get(key) is not None:
                hits[key].append(got[key] == want[key])
    return {k: (float(np.mean(v)) if v else float("nan")) for k, v in hits.items()} | {"found": found / len(images)}


def alignment(pipe, *, guidance: float = 5.0, steps: int | None = None, sampler: str | None = None,
              seed: int = 0, prompts: Sequence[dict[str, Any]] | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """How well a pipeline draws what it is asked: each grammar prompt once, scored by the analyser.

    All prompts run as one batch from `seed` (so each gets its own starting noise); steps and
    sampler default to the pipeline's. Returns (scores as `score_alignment`, pixels (N, 3, H, W)).
    """
    prompts = grammar_prompts() if prompts is None else list(prompts)
    result = pipe.generate([p["prompt"] for p in prompts], guidance=guidance, steps=steps, sampler=sampler,
                           seed=seed, progress=False)
    return score_alignment(list(result.pixels), prompts), result.pixels

