"""What a textual-inversion word names on the tiny model: a `Concept`, its captions, its pictures,
the prompts its rate is measured on and how a picture is read.

Three kinds, by where the token goes in a grammar caption (`shapes.caption`):

    shape        the shape's word replaced            "a red <star> on the left"
    background   the token appended                   "a red circle on the left <night>"
    object       colour and shape replaced together   "a small <ptri> at the top"

An object is a colour–shape pair: `PTRI` names a purple triangle, one of the `shapes.HELD_OUT`
pairs no training picture ever showed (the model draws it only by composing the two words).
Training: `sdlearn.ti_train`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import analyser, shapes

KINDS = ("shape", "background", "object")


@dataclass(frozen=True)
class Concept:
    """What a new token names, and where it goes in a caption:
    kind "shape": a shape's word is replaced ("a red <star> on the left"), value a shape `shapes.draw`
    knows; kind "background": the token is appended to a grammar caption ("a red circle on the left
    <night>"), value one of `shapes.BACKGROUNDS`; kind "object": colour and shape are replaced
    together ("a <ptri> on the left"), value a (colour, shape) pair of `shapes.COLOURS` × `shapes.SHAPES`.
    `init`: the word whose row the token starts from."""
    token: str
    kind: str
    value: str | tuple[str, str]
    init: str

    def __post_init__(self):
        known = {"shape": (*shapes.SHAPES, *shapes.EXTRA_SHAPES), "background": tuple(shapes.BACKGROUNDS),
                 "object": [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]}
        value = tuple(self.value) if isinstance(self.value, list) else self.value    # a JSON record's list
        object.__setattr__(self, "value", value)
        if self.kind not in known or value not in known[self.kind]:
            raise ValueError(f"a concept is a shape {known['shape']}, a background {known['background']} or an "
                             f"object (colour, shape) of {tuple(shapes.COLOURS)} × {shapes.SHAPES}; "
                             f"found {self.kind} {self.value!r}")

    @property
    def words(self) -> str:
        """What the token stands for in the grammar's words ("purple triangle", "star", "black")."""
        return " ".join(self.value) if self.kind == "object" else self.value


STAR = Concept("<star>", "shape", "star", "triangle")
NIGHT = Concept("<night>", "background", "black", "picture")
PTRI = Concept("<ptri>", "object", ("purple", "triangle"), "triangle")
CONCEPTS = {"star": STAR, "night": NIGHT, "ptri": PTRI}


def concept_caption(concept: Concept, obj: dict, rng: np.random.Generator) -> str:
    """A grammar caption for one object (`shapes.caption`) that says the concept with its token:
    the shape's word replaced ("red <star>, left"), colour and shape replaced ("a large <ptri>"), or
    the token appended ("a red circle <night>").

    An object's token stands in for both words, so the grammar writes it as both and the pair is
    merged ("<ptri> <ptri>" → "<ptri>"); the captions that leave one word out keep it once ("a <ptri>
    on the left", "a <ptri> shape"): every caption says the token exactly once.
    Appended, not inserted: CLIP's text encoder is causal, so every word before the token reads
    exactly as in the plain caption (colour, shape and position stay what the model knows) and only
    the token and what follows it (the end token) carry the new meaning. No comma before it: in
    the grammar a comma says a position comes next ("red circle, left")."""
    t = concept.token
    if concept.kind == "shape":
        return shapes.caption([obj | {"shape": t}], rng)
    if concept.kind == "object":
        return shapes.caption([obj | {"colour": t, "shape": t}], rng).replace(f"{t} {t}", t)
    return shapes.caption([obj], rng) + " " + t


def concept_dataset(concept: Concept, n: int = 48, seed: int = 0, sizes=None) -> shapes.ShapeDataset:
    """n one-object pictures that show `concept` (position, background uniform; `sizes` uniform),
    captioned by `concept_caption`. A shape concept: that shape in any colour, large only by default
    (the tiny VAE, which never saw a star, reconstructs a small one as a round blob: its points are
    2–3 pixels). A background concept: any grammar shape (no HELD_OUT pair), any size, on that
    background. An object: that colour and shape, any size."""
    if sizes is None:
        sizes = ("large",) if concept.kind == "shape" else tuple(shapes.SIZES)
    partners = shapes.colour_partners(shapes.HELD_OUT)
    images, captions, attributes = [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        colour = str(rng.choice(list(shapes.COLOURS)))
        shape = concept.value if concept.kind == "shape" else str(rng.choice(partners[colour]))
        if concept.kind == "object":
            colour, shape = concept.value
        obj = shapes.place(rng, {"colour": colour, "shape": shape, "size": str(rng.choice(list(sizes))),
                                  "position": str(rng.choice(list(shapes.POSITIONS)))})
        background = concept.value if concept.kind == "background" else str(rng.choice(list(shapes.BACKGROUNDS)))
        images.append(shapes.draw([obj], background))
        captions.append(concept_caption(concept, obj, rng))
        attributes.append({"background": background, "shapes": [obj]})
    return shapes.ShapeDataset(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions,
                               attributes)


# ----------------------------------------------------------------------------------- measuring

def concept_prompts(concept: Concept, token: str | None = None) -> list[dict]:
    """The prompts a rate is measured on (`token`: default the concept's; "" for the plain prompts;
    any words: "purple triangle"). A shape: 6 colours × (no position + 5 positions), the token for the
    shape ("a red <star> on the left"). A background: the same 36 colour–position cells of
    `shapes.grammar_prompts`, shapes in turn (12 each), the token appended ("a red circle on the left
    <night>"). An object: 18, (no size, small, large) × (no position + 5 positions), as
    `shapes.held_out_prompts` ("a small <ptri> at the top")."""
    token = concept.token if token is None else token
    if concept.kind == "object":
        colour, shape = concept.value
        cells = [(s, p) for s in (None, *shapes.SIZES) for p in (None, *shapes.POSITIONS)]
        words = [[w for w in (s, token, p and shapes.POSITION_PHRASES[p]) if w] for s, p in cells]
        return [{"prompt": " ".join([shapes.article(w[0])] + w), "colour": colour, "shape": shape, "size": s,
                 "position": p} for w, (s, p) in zip(words, cells)]
    cells = [(c, p) for c in shapes.COLOURS for p in (None, *shapes.POSITIONS)]
    if concept.kind == "shape":
        return [{"prompt": " ".join([shapes.article(c), c, token] + ([shapes.POSITION_PHRASES[p]] if p else [])),
                 "colour": c, "position": p} for c, p in cells]
    grammar = {(g["colour"], g["shape"], g["position"]): g for g in shapes.grammar_prompts()}
    chosen = [grammar[c, shapes.SHAPES[i % len(shapes.SHAPES)], p] for i, (c, p) in enumerate(cells)]
    return [g | {"prompt": f"{g['prompt']} {token}".strip()} for g in chosen]


def concept_rate(pipe, concept: Concept, token: str | None = None, *, seeds: tuple[int, ...] = (0, 1),
                 guidance: float = 5.0, steps: int | None = None) -> dict[str, float]:
    """Generate `concept_prompts(concept, token)` once per seed (the pipeline's sampler and steps)
    and read the pictures with `read_concept`."""
    prompts = concept_prompts(concept, token)
    pixels = [pipe.generate([p["prompt"] for p in prompts], guidance=guidance, steps=steps, seed=seed,
                            progress=False).pixels for seed in seeds]
    return read_concept(torch.cat(pixels), concept, prompts * len(seeds))


def read_concept(images, concept: Concept = STAR, wanted: list[dict] | None = None) -> dict[str, float]:
    """Shares of pictures that show the concept ("concept": the largest shape `looks_like_star` or is
    read as the shape; the background `analyser.read_background` reads; the largest shape's colour
    and shape both read as the object's), whose largest shape is read as each grammar shape
    ("as_circle", …), that are on each background ("on_black", …), and the analyser's scores
    against `wanted` (colour, shape, position, found, stray: `analyser.score_alignment`; a score
    none of `wanted` asks for is left out). An object with `wanted`: also "concept_and_position",
    the pair drawn where the prompt asked (anywhere when it names no position)."""
    hits = {"concept": [], **{f"as_{s}": [] for s in shapes.SHAPES}, **{f"on_{b}": [] for b in shapes.BACKGROUNDS}}
    placed = []
    for i, image in enumerate(images):
        objects = analyser.read_scene(image, 1)["objects"]
        got = objects[0] if objects else {"star": False, "shape": None, "colour": None, "position": None}
        background = analyser.read_background(image)
        for s in shapes.SHAPES:
            hits[f"as_{s}"].append(got["shape"] == s)
        for b in shapes.BACKGROUNDS:
            hits[f"on_{b}"].append(background == b)
        if concept.kind == "background":
            hits["concept"].append(background == concept.value)
        elif concept.kind == "object":
            hits["concept"].append((got["colour"], got["shape"]) == concept.value)
            if wanted is not None:
                placed.append(hits["concept"][-1] and wanted[i].get("position") in (None, got["position"]))
        else:
            hits["concept"].append(got["star"] if concept.value == "star" else got["shape"] == concept.value)
    rates = {k: float(np.mean(v)) for k, v in hits.items()}
    if placed:
        rates["concept_and_position"] = float(np.mean(placed))
    if wanted is not None:
        scores = analyser.score_alignment(list(images), [{"shape": None} | w for w in wanted])
        rates |= {k: v for k, v in scores.items() if not np.isnan(v)}
    return rates


def parse_concept(text: str) -> Concept:
    """A name in CONCEPTS ("star", "night", "ptri"), or "shape:square" / "background:beige" /
    "object:purple-triangle" (token "<square>", "<beige>", "<purple-triangle>"; from the row of
    "triangle" for a shape, of "picture" for a background, of its shape's word for an object)."""
    if text in CONCEPTS:
        return CONCEPTS[text]
    kind, _, value = text.partition(":")
    if kind not in KINDS or not value:
        raise ValueError(f"a concept is one of {list(CONCEPTS)} or 'shape:<shape>' / 'background:<background>' / "
                         f"'object:<colour>-<shape>'; found {text!r}")
    token = f"<{value.replace(' ', '-')}>"
    if kind == "object":
        colour, _, shape = value.rpartition("-")
        return Concept(token, kind, (colour.replace("-", " "), shape), shape)
    return Concept(token, kind, value, STAR.init if kind == "shape" else NIGHT.init)
