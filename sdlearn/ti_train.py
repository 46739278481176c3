"""Training textual inversion on the tiny model: one new word for a concept, the model frozen.

Textual inversion (Gal et al. 2022) teaches a model a word without changing it: a new token's
embedding row v is the only thing learned. A `Concept` (sdlearn/ti_concepts.py) says what the word
names and where it goes in a caption: a shape ("a red <star> on the left": the token in the shape
word's place), a background ("a red circle on the left <night>": appended; the tiny model's
pictures have five backgrounds, `shapes.BACKGROUNDS`, that no caption ever names) or an object, a
colour–shape pair ("a small <ptri> at the top": the token for both words):

    v₀ = E[concept.init]                        start from a word the model knows
    captions `concept_caption`                  the grammar, with the token
    z₀ = s · (μ + σ·ε′),  (μ, σ) = VAE encoder(picture)         encoded once (train.encode_dataset)
    L(v) = ‖ε − ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, CLIP_v(caption))‖²    train.noise_prediction_loss
    v ← AdamW(v, ∇_v L)                         CLIP, the UNet, the VAE and every other row frozen

where CLIP_v is the text encoder whose table row for the token reads v (`row_override`). The
result is saved in diffusers' format (learned_embeds.safetensors) and loads back with
`pipe.load_textual_inversion` or diffusers' `load_textual_inversion`.

    from sdlearn.ti_concepts import NIGHT, concept_rate
    pipe = sdlearn.load_pipeline("tiny")
    result = train(pipe, NIGHT, steps=600, lr=0.1, vectors=8)    # about 1.5 minutes on one CPU thread
    concept_rate(pipe, NIGHT)                     # how often "… <night>" draws a black background
    pipe.load_textual_inversion(NIGHT_EMBEDDING)  # the shipped result, without training
    read_record("night")["rate"]                  # the shares it measured (sdlearn/data/night_embedding.json)

A lesson in three runs (one CPU thread of a shared 2-core machine; the JSON records beside the
shipped files hold the figures): textual inversion can only *name* what the model already draws
in answer to its text.
- `<night>` (sdlearn/data/night_embedding.json), 8 vectors from the row of "picture": the
  backgrounds are in every training picture, only the words never said which. 600 steps in 92 s;
  of the 72 pictures (36 grammar prompts × 2 seeds) 57 % are black with the token, 35 % without
  it (the model's own lean), 39 % with the initial rows; colour, shape, position stay right
  (100 %, 96 %, 100 %). A real but partial effect: the UNet draws black backgrounds, but it chose
  them from the starting noise, never from the text (no caption named one), so its
  cross-attention has little to steer them with.
- `<star>` (sdlearn/data/star_embedding.json), from the row of "triangle": 600 steps in 227 s
  (on a loaded machine); the 72 pictures keep their colour and position (100 %), but the token
  draws *circles* (90 %; the triangle's row drew triangles, 93 %), never a star (0 %). Not for
  want of training: the same code teaches squares from the triangle's row in 300 steps (100 %
  squares, nearest word "square"). The limit is the UNet, which never saw a star: the VAE shows
  stars (97 % of its reconstructions read as stars), but image-to-image from star pictures at
  strength 0.3, prompts naming no shape, keeps none (0 %): the UNet turns a star into a shape it
  knows, and an embedding changes only the text it reads.
- `<ptri>` (sdlearn/data/ptri_embedding.json), one vector from the row of "triangle": a purple
  triangle, one of the `shapes.HELD_OUT` pairs no training picture showed. 600 steps at lr 0.05
  in 92 s; of the 36 pictures (18 prompts, sizes × positions, × 2 seeds) 58 % are purple
  triangles where and as large as asked (purple 97 %, triangles 61 %); the initial row drew
  triangles (97 %), never purple (0 %). The learned row's nearest words are "purple" (cosine
  0.49) and "triangle" (0.28). The plain words "purple triangle" do a little better (67 %) and the
  trained pair "red triangle" much better (94 %): the UNet composes the unseen pair from its two
  words only part of the time (on the model before its loose-caption steps, all three drew
  100 %), and textual inversion finds one row that says nearly as much as the two words, as it
  can for anything the model draws from its text.

Command lines (the shipped embeddings were made so; their JSON records hold them; an existing
--out file or record is replaced only with --force):
    python -m sdlearn.ti_train --concept night --steps 600 --lr 0.1 --vectors 8 --out sdlearn/data/night_embedding.safetensors
    python -m sdlearn.ti_train --steps 600 --control --out sdlearn/data/star_embedding.safetensors
    python -m sdlearn.ti_train --concept ptri --steps 600 --lr 0.05 --out sdlearn/data/ptri_embedding.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes, textual_inversion, ti_concepts
from .pipeline import load_pipeline
from .schedule import NoiseSchedule
from .train import encode_dataset, noise_prediction_loss

__all__ = ["DATA", "STAR_EMBEDDING", "NIGHT_EMBEDDING", "PTRI_EMBEDDING", "word_row", "nearest_words", "row_override",
           "ti_step", "TIResult", "train", "unet_ceiling", "read_record", "main"]
DATA = Path(__file__).parent / "data"
STAR_EMBEDDING = DATA / "star_embedding.safetensors"
NIGHT_EMBEDDING = DATA / "night_embedding.safetensors"
PTRI_EMBEDDING = DATA / "ptri_embedding.safetensors"


# ----------------------------------------------------------------------------------- the new row

def word_row(pipe, word: str) -> torch.Tensor:
    """The embedding row (D,) of a word that is one token ("triangle" → the row of 'triangle</w>')."""
    ids = pipe.tokenizer.encode(word)[1:-1]
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens; start from a word that is one token")
    return textual_inversion.token_embedding(pipe).weight[ids[0]].detach().clone()


def nearest_words(pipe, vector: torch.Tensor, k: int = 5, words: list[str] | None = None) -> list[tuple[str, float]]:
    """The k words whose rows are nearest to `vector` by cosine similarity
    cos(v, E_i) = v·E_i / (‖v‖ ‖E_i‖), best first: what a learned embedding is "near". Among the
    whole vocabulary, or only `words` (one token each), e.g. `pipe.vocabulary["words"]`, the words
    the tiny model was trained on: its other 49k rows never got a gradient and are noise."""
    table = textual_inversion.token_embedding(pipe).weight.detach()
    if words is None:
        names, rows = None, table[:len(pipe.tokenizer.encoder)]
    else:
        names = list(words)
        rows = torch.stack([word_row(pipe, w) for w in names]).to(table)
    cos = F.cosine_similarity(rows, vector.detach().to(table)[None], dim=-1)
    best = cos.topk(min(k, len(rows)))
    return [(pipe.tokenizer.decode([i]) if names is None else names[i], round(c, 4))
            for i, c in zip(best.indices.tolist(), best.values.tolist())]


@contextmanager
def row_override(text_encoder, token_ids, vectors: torch.Tensor):
    """Inside the block, the token-embedding lookup gives row k of `vectors` (n, D) wherever the
    id is token_ids[k] (one id and a row (D,) for one token): x_i = v_k if id_i = token_ids[k] else
    E[id_i]. The table is untouched, and gradients reach the vectors only."""
    embedding = text_encoder.text_model.embeddings.token_embedding
    token_ids = torch.as_tensor(token_ids).reshape(-1)
    vectors = vectors.reshape(len(token_ids), -1)

    def hook(module, inputs, out):
        match = inputs[0][..., None] == token_ids.to(inputs[0].device)          # (B, L, n)
        return torch.where(match.any(-1)[..., None], match.to(out.dtype) @ vectors.to(out.dtype), out)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def ti_step(pipe, vector: torch.Tensor, token_id, optimizer, z0: torch.Tensor, ids: torch.Tensor,
            t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule) -> float:
    """One step of textual inversion: the ε-prediction loss with `vector` as the token's row (or
    rows (n, D) for the ids `token_id`), its gradient (to `vector` only: every model weight is
    frozen), an optimizer step. → the loss."""
    with row_override(pipe.text_encoder, token_id, vector):
        loss = noise_prediction_loss(lambda z_t, t_, c: pipe.unet(z_t, t_, pipe.text_encoder(c)),
                                     z0, t, noise, ids, schedule)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


# ----------------------------------------------------------------------------------- training

@dataclass
class TIResult:
    token: str
    vector: torch.Tensor               # (D,): the learned row ((n, D): n vectors)
    initial: torch.Tensor              # (D,) or (n, D): the row(s) it started from
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)


def train(pipe, concept: ti_concepts.Concept = ti_concepts.STAR, *, steps: int = 600, batch: int = 16,
          lr: float = 0.02, images: int = 48, seed: int = 0, weight_decay: float = 0.0,
          time_budget: float | None = None, timesteps: tuple[int, int] | None = None, vectors: int = 1, progress: bool = True) -> TIResult:
    """Learn `concept.token`'s row on `images` pictures of the concept (`concept_dataset`) for
    `steps` steps (or until `time_budget` seconds), starting from the row of `concept.init`
    (`vectors` > 1: that many rows, tokens <t>, <t>_1, …, as diffusers' multi-vector embeddings;
    `timesteps`: draw t from this range [lo, hi) instead of all of them). Adds the token(s) to
    `pipe` (if not there yet) and leaves the learned rows in its table; the model's weights are
    left as they were."""
    token = concept.token
    if token not in pipe.tokenizer.added_tokens:
        with torch.no_grad():
            rows = word_row(pipe, concept.init)[None].repeat(vectors, 1)
        textual_inversion.load_rows(pipe, token, rows)
    token_id = torch.tensor([pipe.tokenizer.added_tokens[t] for t in textual_inversion.token_names(token, vectors)])
    data = ti_concepts.concept_dataset(concept, images, seed)
    mean, std = encode_dataset(pipe.vae, data.images, pipe.device)
    captions = [[ti_concepts.concept_caption(concept, a["shapes"][0], np.random.default_rng([seed, i, k]))
                 for k in range(4)] for i, a in enumerate(data.attributes)]
    ids = pipe.tokenizer([textual_inversion.expand_prompt(pipe.tokenizer, c) for cs in captions for c in cs])
    ids = ids.view(len(captions), 4, -1)
    schedule, scale = NoiseSchedule.scaled_linear(), pipe.vae.scaling_factor
    initial = textual_inversion.token_embedding(pipe).weight[token_id].detach().clone().squeeze(0)
    vector = initial.clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([vector], lr=lr, weight_decay=weight_decay)
    frozen = [p for m in (pipe.text_encoder, pipe.unet) for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses, start = [], time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    try:
        for step in range(steps):
            idx = torch.randint(len(mean), (batch,), generator=g)
            which = torch.randint(ids.shape[1], (batch,), generator=g)
            t = torch.randint(*(timesteps or (0, schedule.num_train_timesteps)), (batch,), generator=g)
            z0 = scale * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g))
            noise = torch.randn(z0.shape, generator=g)
            losses.append(ti_step(pipe, vector, token_id, optimizer, z0.to(pipe.device), ids[idx, which], t,
                                  noise.to(pipe.device), schedule))
            if progress and (step + 1) % 25 == 0:
                print(f"step {step + 1}: loss {np.mean(losses[-25:]):.4f}", file=sys.stderr)
            if time_budget is not None and time.perf_counter() - start > time_budget:
                break
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        textual_inversion.token_embedding(pipe).weight[token_id] = vector.detach().reshape(len(token_id), -1)
    settings = dict(concept=asdict(concept), steps=len(losses), batch=batch, lr=lr, images=images, seed=seed,
                    weight_decay=weight_decay, timesteps=timesteps, vectors=vectors, torch_threads=torch.get_num_threads())
    return TIResult(token, vector.detach().clone(), initial, losses, time.perf_counter() - start, settings)


# ----------------------------------------------------------------------------------- measuring

def unet_ceiling(pipe, n: int = 36, seed: int = 100, strength: float = 0.3) -> dict[str, float]:
    """Can this model hold a star at all? Star rates of (1) the VAE's reconstructions of star
    pictures (what the decoder can show) and (2) image-to-image from them at a low `strength`
    with prompts that name no shape ("a red shape on the left": the tiny model learned to keep
    what such a picture shows): if (2) is near 0, the UNet turns stars into shapes it knows, and
    no embedding (which only changes the text) can make it draw one."""
    data = ti_concepts.concept_dataset(ti_concepts.STAR, n, seed)
    x = data.images.float() / 255
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(x * 2 - 1).mean).clamp(-1, 1) / 2 + 0.5
    prompts = [shapes.phrase(a["shapes"][0], with_size=False, with_position=True, with_shape=False)
               for a in data.attributes]
    kept = pipe.generate(prompts, image=x, strength=strength, guidance=5.0, seed=seed, progress=False).pixels
    return {"vae_reconstruction": ti_concepts.read_concept(recon)["concept"],
            f"img2img_{strength:g}": ti_concepts.read_concept(kept)["concept"]}


# ----------------------------------------------------------------------------------- records

RECORD_KEYS = ("command", "seconds", "settings", "loss_first_25", "loss_last_25", "rate", "nearest_words", "machine")


def read_record(name: str | os.PathLike) -> dict:
    """The JSON record `main` writes beside an embedding: a shipped one by name ("star", "night",
    "ptri": sdlearn/data/<name>_embedding.json) or any record or embedding file's path.
    record["rate"][run][share]: run "learned", "initial (<init>'s row)", "without the token", …;
    share "concept" (the pictures that show it), "colour", "as_circle", … (`ti_concepts.read_concept`).
    record["settings"]: the training's settings, the concept among them; record["nearest_words"]:
    per vector, the nearest words and their cosine similarity."""
    path = DATA / f"{name}_embedding.json" if str(name) in ti_concepts.CONCEPTS else Path(name).with_suffix(".json")
    record = json.loads(path.read_text())
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"{path.name} lacks {missing}: not a record written by python -m sdlearn.ti_train")
    return record


# ----------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """Train, measure against the initial row (and the plain prompts), save the embedding and a
    JSON record beside it."""
    p = argparse.ArgumentParser(prog="python -m sdlearn.ti_train", description=__doc__.split("\n")[0])
    p.add_argument("--concept", default="star", help="star (a shape the UNet never saw), night (the black "
                   "background no caption names), ptri (the held-out purple triangle), shape:<shape>, "
                   "background:<background> or object:<colour>-<shape>")
    p.add_argument("--init", help="the word whose row the token starts from (default: the concept's)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--vectors", type=int, default=1, help="rows for the token (diffusers' multi-vector embedding)")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the embedding file (default: sdlearn/data/<concept>_embedding.safetensors)")
    p.add_argument("--control", action="store_true",
                   help="(a shape) also teach a token squares, from the triangle's row (a shape the UNet can draw)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file and its .json record")
    args = p.parse_args(argv)
    out = Path(args.out or DATA / f"{args.concept.split(':')[-1]}_embedding.safetensors")
    existing = [str(f) for f in (out, out.with_suffix(".json")) if f.exists()]
    if existing and not args.force:
        them = "it" if len(existing) == 1 else "them"
        print(f"{' and '.join(existing)} already exist{'s' * (them == 'it')}: pass --force to replace {them}, "
              "or --out another file", file=sys.stderr)
        return 1
    concept = ti_concepts.parse_concept(args.concept)
    if args.init:
        concept = replace(concept, init=args.init)
    torch.set_num_threads(1)
    pipe = load_pipeline("tiny")
    result = train(pipe, concept, steps=args.steps, batch=args.batch, lr=args.lr, images=args.images,
                   seed=args.seed, time_budget=args.time_budget, vectors=args.vectors)
    rates = {"learned": ti_concepts.concept_rate(pipe, concept)}
    with torch.no_grad():
        ids = [pipe.tokenizer.added_tokens[t] for t in textual_inversion.token_names(concept.token, args.vectors)]
        textual_inversion.token_embedding(pipe).weight[ids] = result.initial.reshape(len(ids), -1)
    rates[f"initial ({concept.init}'s row)"] = ti_concepts.concept_rate(pipe, concept)
    if concept.kind == "background":
        rates["without the token"] = ti_concepts.concept_rate(pipe, concept, "")
    if concept.kind == "object":
        rates[f"the words '{concept.words}'"] = ti_concepts.concept_rate(pipe, concept, concept.words)
        reference = trained_pair(concept)
        rates[f"a trained pair's words '{reference.words}'"] = ti_concepts.concept_rate(pipe, reference,
                                                                                          reference.words)
    textual_inversion.save(out, concept.token, result.vector)
    vocabulary = pipe.vocabulary and pipe.vocabulary["words"]          # the words the tiny model learned
    record = {"command": "python -m sdlearn.ti_train " + " ".join(argv if argv is not None else sys.argv[1:]),
              "seconds": round(result.seconds, 1), "settings": result.settings,
              "loss_first_25": float(np.mean(result.losses[:25])), "loss_last_25": float(np.mean(result.losses[-25:])),
              "rate": rates, "nearest_words": [nearest_words(pipe, v, words=vocabulary) for v in result.vector.reshape(args.vectors, -1)]}
    if concept.kind == "shape" and concept.value == "star":
        record["star_rate_ceiling"] = unet_ceiling(pipe)
    if args.control:
        record["control_square"] = _square_control(args)
    record["machine"] = {"cpu_count": os.cpu_count(), "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


def trained_pair(concept: ti_concepts.Concept) -> ti_concepts.Concept:
    """A pair the tiny model was trained on, for reference: the object's shape in the first colour
    whose pair with it is not in `shapes.HELD_OUT` ("purple triangle" → "red triangle")."""
    shape = concept.value[1]
    colour = next(c for c in shapes.COLOURS if not shapes.is_held_out(c, shape) and c != concept.value[0])
    return ti_concepts.Concept(f"<{colour}-{shape}>", "object", (colour, shape), shape)


def _square_control(args) -> dict:
    """The same training on squares (a shape the UNet draws) from the triangle's row: does the
    method work where the model can draw the concept? Shares read as square, learned vs initial."""
    pipe, square = load_pipeline("tiny"), ti_concepts.Concept("<square-check>", "shape", "square", "triangle")
    result = train(pipe, square, steps=args.steps // 2, batch=args.batch, lr=args.lr, images=args.images,
                   seed=args.seed, progress=False)
    learned = ti_concepts.concept_rate(pipe, square, seeds=(0,))["concept"]
    with torch.no_grad():
        textual_inversion.token_embedding(pipe).weight[pipe.tokenizer.added_tokens[square.token]] = result.initial
    return {"steps": len(result.losses), "seconds": round(result.seconds, 1), "as_square_learned": learned,
            "as_square_initial": ti_concepts.concept_rate(pipe, square, seeds=(0,))["concept"],
            "nearest_words": nearest_words(pipe, result.vector, 3)}


if __name__ == "__main__":
    sys.exit(main())
