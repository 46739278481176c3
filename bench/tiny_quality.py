"""Quality and speed of the tiny model: does it draw what it is asked, and how fast?

    .venv/bin/python bench/tiny_quality.py                     # every table (≈ 45 min on 2 cores)
    .venv/bin/python bench/tiny_quality.py --model runs/x.safetensors --only samplers,pairs

Every figure is the project's analyser (`sdlearn.analyser`) reading pictures back, one seed per
prompt (each table's prompts run as one batch from --seed, so every prompt has its own noise),
at the model's defaults (its sampler and steps, guidance 7.5) unless a table varies one:

  samplers   the 108 one-object grammar prompts (`shapes.grammar_prompts`: 6 colours × 3 shapes
             × no position + 5 positions) with each of the six samplers at its default steps
             (and PNDM at 50, diffusers' default):
             colour, shape, position (of the 90 that name one), stray blobs, circles read round.
             The 18 prompts of held-out colour–shape pairs (never in training) are scored apart.
  seeds      the samplers table's 90 trained prompts from --seed and each of --more-seeds, every
             sampler at its default steps: colour and strays seed by seed, and colour / shape /
             position averaged over the seeds (one picture is 1.1 points of 90, 1.3 of the 75
             positions).
  pndm       PNDM alone, colour and strays on the same prompts, over steps at guidance 7.5 and
             over guidance at 20 steps, from seed --seed and the first of --more-seeds
             (notebook 06, Going further: why a four-step extrapolation needs small steps).
  windows    PNDM at 20 steps with its Adams–Bashforth mix kept only on a window of steps and the
             newest ε alone (DDIM's update) elsewhere after its warm-up: where the damage comes
             from (seeds as in the pndm table).
  stiffness  why PNDM breaks at 20 steps: along the seed's guided 20-step DDIM runs of the 90
             trained one-object prompts, the largest eigenvalue λ of ∂ε̂/∂x̄ (x̄ = x/√ᾱ, power
             iteration; times σ, so 1 is what a denoiser has along a direction its x̂₀ ignores) for
             the unconditional, the conditional and the guided ε̂, next to the guided ε̂ of the
             *exact* denoiser of the model's own training set (its pictures encoded by its VAE),
             and what Adams–Bashforth 4 tolerates there (|hλ| < 0.3). About 10 minutes.
  exact      that exact denoiser in place of the UNet (`ExactDenoiser`: what a UNet trained to the
             optimum on exactly these pictures and captions would return), each sampler, the
             samplers table's prompts and noise: colour, shape, position, strays, the model's beside;
             then DDIM with more steps, clean captions, and PNDM at the first of --more-seeds, with
             the prompts drawn in a wrong colour. About 8 minutes (with the stiffness table, which shares
             its encoding of the training set: about 17; 20 run apart).
  held_out   the 54 held-out one-object prompts (`shapes.held_out_prompts`, with sizes).
  pairs      the 120 two-object prompts (`shapes.pair_prompts`) at several guidance scales:
             both objects right (colour, shape and side), swaps, colour leaks, strays; the
             prompts with a held-out pair apart. Plus "no prompt" (the unconditional ε alone).
  img2img    each one-object grammar prompt drawn, then re-drawn from that picture at several
             strengths, (a) re-prompted with another colour and another shape (same position):
             the share that follows the new prompt (both read as asked); (b) with its own
             prompt: the share whose colour, shape and position are read as in the picture.
  speed      one 64×64 image with the defaults, median of --repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from sdlearn import analyser, shapes  # noqa: E402
from sdlearn.device import ENV_THREADS  # noqa: E402
from sdlearn.pipeline import load_pipeline  # noqa: E402
from sdlearn.safetensors_file import SafetensorsFile  # noqa: E402
from sdlearn.samplers import SAMPLERS, PNDMSampler, StepOutput  # noqa: E402
from sdlearn.sources import TINY_PATH  # noqa: E402
from sdlearn.toy import alpha_bar_at  # noqa: E402
from sdlearn.train import encode_dataset  # noqa: E402

DEFAULT_GUIDANCE = 7.5
TARGETS = """issue 15 targets: one object ≥ 98 % colour, shape, position for each sampler; two objects
both right ≥ 85 % at the default guidance and ≥ 20 points lower at guidance 1; img2img re-prompted
≤ 20 % at strength 0.2, ≥ 90 % at 0.9, same prompt kept ≥ 95 % at ≤ 0.5; strays ≤ 5 %."""


def pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f} %"


def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


_SCORES: dict = {}   # (sampler, steps, guidance, seed) → the trained one-object prompts' scores


def samplers(pipe, seed: int) -> None:
    prompts = shapes.grammar_prompts()
    seen = [i for i, p in enumerate(prompts) if not p["held_out"]]
    held = [i for i, p in enumerate(prompts) if p["held_out"]]
    rows = []
    # every sampler at the model's default steps (what generate(sampler=name) runs), and PNDM again
    # at 50, diffusers' default for SD v1.5: a four-step extrapolation needs the smaller steps
    for name, steps in [(name, pipe.default_steps) for name in SAMPLERS] + [("pndm", 50)]:
        t0 = time.perf_counter()
        pixels = pipe.generate([p["prompt"] for p in prompts], sampler=name, steps=steps,
                               guidance=DEFAULT_GUIDANCE, seed=seed, progress=False).pixels
        seconds = (time.perf_counter() - t0) / len(prompts)
        s = analyser.score_alignment([pixels[i] for i in seen], [prompts[i] for i in seen])
        h = analyser.score_alignment([pixels[i] for i in held], [prompts[i] for i in held])
        _SCORES[name, steps, DEFAULT_GUIDANCE, seed] = s
        rows.append([f"{name}{' (default)' if name == pipe.default_sampler else ''}", str(steps), pct(s["colour"]),
                     pct(s["shape"]), pct(s["position"]), pct(s["stray"]), pct(s["circle"]),
                     f"{pct(h['colour'])} / {pct(h['shape'])} / {pct(h['position'])}", f"{seconds:.3f}"])
    print(f"one object, {len(seen)} trained prompts (+ {len(held)} held-out), guidance {DEFAULT_GUIDANCE:g}, seed {seed}:")
    table(["sampler", "steps", "colour", "shape", "position", "stray", "circle round", "held-out c / s / p",
           "s per image (batched)"], rows)


def _one_object(pipe, sampler: str, steps: int, guidance: float, seed: int, cache: bool = True) -> dict:
    """The samplers table's scores for the trained one-object prompts. All 108 prompts run as one
    batch, as in that table, so that each prompt gets the same noise there and here (runs repeated
    between the tables are scored once; cache=False for a variant registered under a sampler's name)."""
    key = (sampler, steps, guidance, seed)
    if not cache or key not in _SCORES:
        prompts = shapes.grammar_prompts()
        seen = [i for i, p in enumerate(prompts) if not p["held_out"]]
        pixels = pipe.generate([p["prompt"] for p in prompts], sampler=sampler, steps=steps, guidance=guidance,
                               seed=seed, progress=False).pixels
        scores = analyser.score_alignment([pixels[i] for i in seen], [prompts[i] for i in seen])
        if not cache:
            return scores
        _SCORES[key] = scores
    return _SCORES[key]


def seeds(pipe, seed: int, more: list[int]) -> None:
    all_seeds = [seed, *more]
    rows = []
    for name in SAMPLERS:
        scores = [_one_object(pipe, name, pipe.default_steps, DEFAULT_GUIDANCE, s) for s in all_seeds]
        mean = {k: statistics.mean(sc[k] for sc in scores) for k in ("colour", "shape", "position")}
        rows.append([name, " / ".join(pct(sc["colour"]) for sc in scores), " / ".join(pct(sc["stray"]) for sc in scores),
                     f"{pct(mean['colour'])} / {pct(mean['shape'])} / {pct(mean['position'])}"])
    print(f"one object, the samplers table's trained prompts from seeds {', '.join(map(str, all_seeds))} "
          f"({pipe.default_steps} steps, guidance {DEFAULT_GUIDANCE:g}):")
    table(["sampler", "colour, seed by seed", "stray, seed by seed", "all seeds: colour / shape / position"], rows)


def pndm(pipe, seed: int, more: list[int]) -> None:
    runs = [(steps, DEFAULT_GUIDANCE) for steps in (20, 30, 40, 50)] + [(20, g) for g in (3.0, 4.0, 5.0)]
    two = [seed, *more[:1]]
    rows = []
    for steps, g in runs:
        scores = [_one_object(pipe, "pndm", steps, g, s) for s in two]
        rows.append([str(steps), f"{g:g}", " / ".join(pct(sc["colour"]) for sc in scores),
                     " / ".join(pct(sc["stray"]) for sc in scores)])
    print(f"PNDM, the samplers table's trained prompts, seeds {' / '.join(map(str, two))}:")
    table(["steps", "guidance", "colour", "stray"], rows)


class PNDMWindow(PNDMSampler):
    """PNDM with the Adams–Bashforth mix only at the model calls numbered in `window` (PNDM's
    counter: 20 steps are 21 calls, the first step, 951 → 901, taken twice as a warm-up without
    the mix (calls 0 and 1), then calls 2 … 20 at t = 901, 851, …, 1); at the other calls after the
    warm-up it steps with the newest ε alone, DDIM's transfer. window=range(2, steps + 1) is PNDM
    itself, range(0) DDIM after PNDM's warm-up. A subclass that sets `visited` to a list gets the
    timestep of every call appended to it (the table's labels)."""
    name = "pndm_window"
    window: range = range(0)
    visited: list[int] | None = None

    def step(self, eps, t, x, generator=None):
        call = self.counter
        if self.visited is not None:
            self.visited.append(int(t))
        out = super().step(eps, t, x, generator)        # keeps PNDM's memory of past ε either way
        if call < 2 or call in self.window:
            return out
        t = int(t)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        return StepOutput(self._transfer(x, eps, t, prev_t), out.pred_original_sample)


def windows(pipe, seed: int, more: list[int], steps: int = 20) -> None:
    last = steps                                          # PNDM's calls: 0 … steps, the mix from call 2
    every = range(2, last + 1)
    fifths = [range(a, min(a + 5, last + 1)) for a in range(2, last + 1, 5)]
    half = (last + 3) // 2
    spans = [every, range(0), *fifths, range(2, half), range(half, last + 1)]
    two = [seed, *more[:1]]
    rows = []
    for span in spans:
        if span == every:                                 # PNDM itself (the pndm table's runs)
            scores = [_one_object(pipe, "pndm", steps, DEFAULT_GUIDANCE, s) for s in two]
            label = f"every step after the warm-up ({len(every)}: PNDM)"
        else:
            variant = type("Window", (PNDMWindow,), {"window": span, "visited": []})
            with mock.patch.dict(SAMPLERS, {"pndm": variant}):
                scores = [_one_object(pipe, "pndm", steps, DEFAULT_GUIDANCE, s, cache=False) for s in two]
            t = variant.visited                            # the timestep of each call, as the run visited them
            label = (f"t = {t[span[0]]} … {t[span[-1]]} ({len(span)} steps)" if span
                     else "none (DDIM after the warm-up)")
        rows.append([label, " / ".join(pct(sc["colour"]) for sc in scores), " / ".join(pct(sc["stray"]) for sc in scores)])
    print(f"PNDM at {steps} steps ({steps + 1} model calls: the first step twice, as a warm-up), guidance "
          f"{DEFAULT_GUIDANCE:g}, its Adams–Bashforth mix only on the steps from the timesteps named "
          f"(elsewhere the newest ε alone), seeds {' / '.join(map(str, two))}:")
    table(["Adams–Bashforth on", "colour", "stray"], rows)


def largest_eigenvalue(f, x: torch.Tensor, iters: int = 25) -> torch.Tensor:
    """The eigenvalue of largest size of ∂f/∂x for each sample of a batch (f acts on the samples
    separately), by power iteration: J·v by central differences (a step of 1 % of |x| per
    sample), the sign from v · J·v. → (B,). It converges when one real eigenvalue is larger in
    size than the others; with two of nearly equal size and opposite signs (some prompts at the
    highest t) it returns an estimate of that size whose sign may be either."""
    dims = tuple(range(1, x.dim()))
    delta = 1e-2 * torch.linalg.vector_norm(x, dim=dims, keepdim=True)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)
    for _ in range(iters + 1):
        v = v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        jv = (f(x + delta * v) - f(x - delta * v)) / (2 * delta)
        lam = (v * jv).sum(dims)
        v = jv
    return lam


def mistake_odds(colour: str, shape: str) -> dict[tuple[str, str], float]:
    """What `shapes.mistake` calls a one-shape picture of (colour, shape), exactly: one kind with
    probability ⅓ each (another colour, another shape, or both; each replacement uniform among
    the others), a description that names a held-out pair drawn again from the start.
    → {(colour, shape) said: probability}"""
    colours = [c for c in shapes.COLOURS if c != colour]
    kinds = [c for c in shapes.SHAPES if c != shape]
    odds: dict[tuple[str, str], float] = {}
    for said, p in ([((c, shape), 1 / len(colours)) for c in colours] + [((colour, k), 1 / len(kinds)) for k in kinds]
                    + [((c, k), 1 / (len(colours) * len(kinds))) for c in colours for k in kinds]):
        if said not in shapes.HELD_OUT:
            odds[said] = odds.get(said, 0.0) + p / 3
    total = sum(odds.values())                      # what is left after the re-draws: renormalised
    return {said: p / total for said, p in odds.items()}


def caption_weights(prompt: dict, pictures: list[dict], noise: float) -> torch.Tensor:
    """P(a training caption names what the one-object `prompt` (a `shapes.grammar_prompts` entry)
    names | picture) for each picture, up to a factor the same for all: the picture must hold one
    shape, at the prompt's position if it names one (a mistake keeps a single shape's position);
    then 1 − noise if its colour and shape are the prompt's, else noise × the odds that
    `shapes.mistake` says the prompt's (`mistake_odds`)."""
    odds: dict[tuple[str, str], dict] = {}
    out = []
    for pic in pictures:
        if len(pic["shapes"]) != 1 or (prompt["position"] and pic["shapes"][0]["position"] != prompt["position"]):
            out.append(0.0)
            continue
        drawn = (pic["shapes"][0]["colour"], pic["shapes"][0]["shape"])
        if drawn == (prompt["colour"], prompt["shape"]):
            out.append(1 - noise)
            continue
        if drawn not in odds:
            odds[drawn] = mistake_odds(*drawn)
        out.append(noise * odds[drawn].get((prompt["colour"], prompt["shape"]), 0.0))
    return torch.tensor(out, dtype=torch.float64)


def exact_guided_stiffness(xbar: torch.Tensor, z: torch.Tensor, weights: torch.Tensor, sigma: float,
                           guidance: float) -> tuple[float, float, float]:
    """The exact denoiser of a finite training set (latents z (N, D), every one equally likely
    unconditionally, `weights` ∝ p(caption | picture) conditionally) at x̄ (D,) and σ: its x̂₀ is
    the posterior mean of z, ∂x̂₀/∂x̄ = Cov[z | x̄]/σ², so σ ∂ε̂/∂x̄ = I − Cov/σ² and guided
    σ ∂ε̂_g/∂x̄ = I − (g Cov_c − (g − 1) Cov_u)/σ². → (its eigenvalue of largest size, the
    largest posterior weight of one training picture, unconditional and conditional: near 1, the
    exact denoiser only recalls that picture, and its Jacobian says nothing about a model that
    generalises)."""
    s2 = sigma ** 2
    log_lik = -((z - xbar) ** 2).sum(1) / (2 * s2)

    def posterior_cov(log_w):
        w = torch.softmax(log_w, 0)
        d = (z - w @ z) * w.sqrt()[:, None]
        return d.T @ d, w.max().item()

    cov_u, top_u = posterior_cov(log_lik)
    keep = weights > 0
    cov_c, top_c = posterior_cov(torch.where(keep, log_lik + weights.clamp_min(1e-300).log(), -torch.inf))
    m = guidance * cov_c - (guidance - 1) * cov_u
    eig = 1 - torch.linalg.eigvalsh((m + m.T) / 2) / s2
    return (eig[0] if eig[0].abs() > eig[-1].abs() else eig[-1]).item(), top_u, top_c


_TRAINING: dict = {}   # model file → training_latents (the stiffness and exact tables share one encoding)


def training_latents(pipe, model: str) -> tuple[torch.Tensor, list[dict], float] | None:
    """The model's training set as its metadata records it (`sdlearn_training`: images, seed, share
    of two shapes, the last part's caption noise), encoded by its VAE (posterior means × scaling
    factor, as the UNet saw them up to the posterior's σ ≈ 0.004), flattened → (z, attributes,
    caption noise); None if the file does not say."""
    if model in _TRAINING:
        return _TRAINING[model]
    raw = SafetensorsFile(model).metadata.get("sdlearn_training")
    if raw is None:
        return None
    info = json.loads(raw)
    s = info["settings"]
    noise = info.get("unet_parts", [{"settings": s}])[-1]["settings"].get("caption_noise", 0.0)
    data = shapes.make_dataset(s["images"], s["seed"], two_shapes=s["two_shapes"], cache_dir=".cache/shapes")
    with torch.inference_mode():
        mean, _ = encode_dataset(pipe.vae, data.images, torch.device("cpu"))
    _TRAINING[model] = (mean * pipe.vae.scaling_factor).flatten(1).double(), data.attributes, noise
    return _TRAINING[model]


class ExactDenoiser:
    """The exact guided ε̂ of a finite training set, called like the pipeline's guided UNet:
    `model(x_in, t)` for a batch whose row i asks for the prompt of `weights[i]`.

    x̂₀ is the posterior mean of the training latents z (N, D) given x̄ = x/√ᾱ: every picture
    equally likely for the unconditional half, picture j weighted by weights[i, j] (∝ p(caption |
    picture), `caption_weights`) for row i's conditional half; guidance mixes them as the
    pipeline mixes ε̂ (linear, so x̂₀ mixes alike), and ε̂ = (x − √ᾱ x̂₀)/√(1 − ᾱ). What a UNet
    trained to the optimum on exactly these pictures and captions would return. A row whose
    caption no training picture ever has (a held-out pair: `shapes.mistake` never names one) has
    no conditional; it gets the unconditional x̂₀ (such rows are not scored)."""

    def __init__(self, z: torch.Tensor, weights: torch.Tensor, schedule, guidance: float):
        self.z, self.schedule, self.guidance = z.double(), schedule, guidance
        weights = torch.where((weights > 0).any(1, keepdim=True), weights.double(), 1.0)
        self.log_prior = torch.where(weights > 0, weights.clamp_min(1e-300).log(), -torch.inf)
        self.z2 = (self.z ** 2).sum(1)

    def __call__(self, x_in: torch.Tensor, t) -> torch.Tensor:
        ab = alpha_bar_at(self.schedule, t).double()
        x = x_in.double().flatten(1)
        xbar, s2 = x / ab.sqrt(), (1 - ab) / ab
        log_lik = -(self.z2 - 2 * xbar @ self.z.T + (xbar ** 2).sum(1, keepdim=True)) / (2 * s2)
        x0_u = torch.softmax(log_lik, 1) @ self.z
        x0_c = torch.softmax(log_lik + self.log_prior[:len(x)], 1) @ self.z
        x0 = x0_u + self.guidance * (x0_c - x0_u)
        return ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).view_as(x_in).to(x_in.dtype)


def _exact_run(pipe, z, pictures, noise: float, sampler: str, steps: int, seed: int):
    """The samplers table's prompts and noise, drawn with `ExactDenoiser` → (scores of the trained
    prompts, "prompt → colour read" for each drawn in a wrong colour)."""
    prompts = shapes.grammar_prompts()
    seen = [i for i, p in enumerate(prompts) if not p["held_out"]]
    denoiser = ExactDenoiser(z, torch.stack([caption_weights(p, pictures, noise) for p in prompts]), pipe.schedule,
                             DEFAULT_GUIDANCE)
    with mock.patch.object(pipe, "eps_model", lambda context, guidance, recorder=None: denoiser):
        pixels = pipe.generate([p["prompt"] for p in prompts], sampler=sampler, steps=steps, guidance=DEFAULT_GUIDANCE,
                               seed=seed, progress=False).pixels
    return (analyser.score_alignment([pixels[i] for i in seen], [prompts[i] for i in seen]),
            _wrong_colours(pixels, prompts, seen))


def _wrong_colours(pixels, prompts, seen) -> list[str]:
    read = {i: analyser.analyse(pixels[i])["colour"] for i in seen}
    return [f"{prompts[i]['prompt']} → {read[i]}" for i in seen if read[i] != prompts[i]["colour"]]


def exact(pipe, model: str, seed: int, more: list[int], steps: int = 20) -> None:
    training = training_latents(pipe, model)
    if training is None:
        print("exact: the file records no training set; no table\n")
        return
    z, pictures, noise = training
    rows = []
    for name, n in [(name, steps) for name in SAMPLERS] + [("pndm", 50)]:
        s, _ = _exact_run(pipe, z, pictures, noise, name, n, seed)
        m = _one_object(pipe, name, n, DEFAULT_GUIDANCE, seed)
        rows.append([name, str(n), f"{pct(s['colour'])} ({pct(m['colour'])})", f"{pct(s['shape'])} ({pct(m['shape'])})",
                     f"{pct(s['position'])} ({pct(m['position'])})", f"{pct(s['stray'])} ({pct(m['stray'])})"])
    print(f"the exact denoiser of the model's {len(z)} training pictures (caption noise {noise:g}) in place of its "
          f"UNet, guidance {DEFAULT_GUIDANCE:g}, seed {seed}, the samplers table's trained one-object prompts "
          "(in brackets: the model, same noise):")
    table(["sampler", "steps", "colour", "shape", "position", "stray"], rows)
    variants = [("ddim", steps, noise, seed), ("ddim", 50, noise, seed), ("ddim", 100, noise, seed),
                ("ddim", steps, 0.0, seed), ("pndm", steps, noise, seed), ("pndm", steps, 0.0, seed),
                *[("pndm", steps, noise, s) for s in more[:1]]]
    rows = []
    for name, n, nz, sd in variants:
        s, wrong = _exact_run(pipe, z, pictures, nz, name, n, sd)
        rows.append([name, str(n), f"{nz:g}", str(sd), pct(s["colour"]), pct(s["stray"]),
                     "; ".join(wrong[:3]) + (f"; … ({len(wrong)})" if len(wrong) > 3 else "")])
    prompts = shapes.grammar_prompts()
    seen = [i for i, p in enumerate(prompts) if not p["held_out"]]
    pixels = pipe.generate([p["prompt"] for p in prompts], sampler="ddim", steps=steps, guidance=DEFAULT_GUIDANCE,
                           seed=seed, progress=False).pixels
    print(f"the exact denoiser again: more steps, clean captions (caption noise 0: the conditional is the "
          f"pictures of the asked colour and shape only), another seed; the model with DDIM at {steps} steps, "
          f"seed {seed}, draws a wrong colour for: {'; '.join(_wrong_colours(pixels, prompts, seen)) or 'none'}")
    table(["sampler", "steps", "caption noise", "seed", "colour", "stray", "wrong colours (prompt → read)"], rows)


def ddim_states(pipe, prompts: list[str], steps: int, seed: int) -> tuple[list[int], dict[int, torch.Tensor]]:
    """A guided DDIM run's timesteps and the x it holds at each of them but the first (the state
    the step from t starts from: what the step before it returned), keyed by t."""
    sampler = SAMPLERS["ddim"](pipe.schedule)
    sampler.set_timesteps(steps)
    ts = [int(t) for t in sampler.timesteps]
    states = {}

    def keep(info):
        if info.step + 1 < len(ts):
            states[ts[info.step + 1]] = info.latents.clone()

    pipe.generate(prompts, sampler="ddim", steps=steps, guidance=DEFAULT_GUIDANCE, seed=seed, progress=False,
                  callback=keep)
    return ts, states


def stiffness(pipe, model: str, seed: int, steps: int = 20, show=(901, 851, 751, 651, 551, 451, 351, 251)) -> None:
    prompts = shapes.grammar_prompts()
    seen = [i for i, p in enumerate(prompts) if not p["held_out"]]
    ts, states = ddim_states(pipe, [p["prompt"] for p in prompts], steps, seed)
    ab = pipe.schedule.alphas_cumprod.double()

    def sig(t: int) -> float:
        return ((1 - ab[t]) / ab[t]).sqrt().item()

    empty = pipe.encode_prompts([""] * len(seen))
    cond = pipe.encode_prompts([prompts[i]["prompt"] for i in seen])
    both = torch.cat([empty, cond])
    training = training_latents(pipe, model)
    if training is not None:
        z, pictures, noise = training
        weights = [caption_weights(prompts[i], pictures, noise) for i in seen]
    rows = []
    for k, t in enumerate(ts[:-1]):
        if t not in show or t not in states:
            continue
        x = states[t][seen]
        scale = (1 - ab[t]).sqrt().item()                   # σ ∂ε̂/∂x̄ = √(1 − ᾱ) ∂ε̂/∂x
        with torch.inference_mode():
            lam = {name: scale * largest_eigenvalue(f, x) for name, f in (
                ("uncond", lambda v: pipe.unet(v, t, empty)), ("cond", lambda v: pipe.unet(v, t, cond)),
                ("guided", lambda v: pipe.eps_model(both, DEFAULT_GUIDANCE)(v, t)))}
        ratio = (sig(ts[k + 1]) - sig(t)) / sig(t)
        cells = [str(t), f"{sig(t):.2f}", f"{ratio:.3f}", f"{0.3 / abs(ratio):.2f}"]
        cells += [f"{lam[n].quantile(0.5):.2f}" for n in ("uncond", "cond")]
        g = lam["guided"]
        cells += [f"{g.quantile(0.5):.2f} ({g.quantile(0.1):.2f}–{g.quantile(0.9):.2f})",
                  f"{(ratio * g).quantile(0.5):.2f}"]
        if training is not None:
            exact = torch.tensor([exact_guided_stiffness(x[j].double().flatten() / ab[t].sqrt(), z, weights[j], sig(t),
                                                         DEFAULT_GUIDANCE) for j in range(len(seen))])
            e, top_u, top_c = exact.T
            cells += [f"{e.quantile(0.5):.2f} ({e.quantile(0.1):.2f}–{e.quantile(0.9):.2f})",
                      f"{(ratio * e).quantile(0.5):.2f}", f"{top_u.quantile(0.5):.3f}",
                      f"{top_c.quantile(0.5):.3f} ({top_c.quantile(0.9):.3f})"]
        rows.append(cells)
    header = ["t", "σ", "h/σ (to the next step)", "AB4 damps while σλ <", "σλ uncond", "σλ cond",
              "σλ guided (10–90 %)", "z = hλ guided"]
    if training is not None:
        header += ["exact denoiser: σλ guided (10–90 %)", "its z", "largest weight of one picture: ε̂_u",
                   "ε̂_c (90 %)"]
    print(f"stiffness along the guided {steps}-step DDIM runs (guidance {DEFAULT_GUIDANCE:g}, seed {seed}) of the "
          f"{len(seen)} trained one-object prompts: σλ, λ the eigenvalue of largest size of ∂ε̂/∂x̄, medians"
          + ("" if training is not None else "; no exact-denoiser columns: the file records no training set")
          + (f"; the exact denoiser of the {len(z)} training pictures, caption noise {noise:g}, at the same states"
             if training is not None else "") + ":")
    table(header, rows)


def held_out(pipe, seed: int) -> None:
    prompts = shapes.held_out_prompts()
    rows = []
    for g in (1.0, DEFAULT_GUIDANCE):
        s, _ = analyser.alignment(pipe, guidance=g, seed=seed, prompts=prompts)
        rows.append([f"{g:g}", pct(s["colour"]), pct(s["shape"]), pct(s["position"]), pct(s["size"]), pct(s["stray"])])
    print(f"held-out colour–shape pairs ({', '.join(' '.join(p) for p in shapes.HELD_OUT)}; never in training), "
          f"{len(prompts)} one-object prompts:")
    table(["guidance", "colour", "shape", "position", "size", "stray"], rows)


def pairs(pipe, seed: int, guidances: list[float]) -> None:
    prompts = shapes.pair_prompts()
    seen = [i for i, p in enumerate(prompts) if not p["held_out"]]
    held = [i for i, p in enumerate(prompts) if p["held_out"]]
    rows = []
    runs = [("no prompt", 1.0, [""] * len(prompts))] + [(f"{g:g}", g, [p["prompt"] for p in prompts]) for g in guidances]
    for label, g, asked in runs:
        pixels = pipe.generate(asked, guidance=g, seed=seed, progress=False).pixels
        s = analyser.score_pairs([pixels[i] for i in seen], [prompts[i] for i in seen])
        h = analyser.score_pairs([pixels[i] for i in held], [prompts[i] for i in held])
        rows.append([label + (" (default)" if g == DEFAULT_GUIDANCE and label != "no prompt" else ""),
                     pct(s["both"]), pct(s["colour"]), pct(s["shape"]), pct(s["position"]), pct(s["swapped"]),
                     pct(s["colour_swap"]), pct(s["colour_leak"]), pct(s["stray"]), pct(h["both"])])
    print(f"two objects, {len(seen)} trained prompts (+ {len(held)} with a held-out pair), seed {seed} "
          "(colour/shape/position: of objects; the rest: of pictures):")
    table(["guidance", "both right", "colour", "shape", "position", "swapped", "colours swapped", "colour leak",
           "stray", "held-out: both right"], rows)


def img2img(pipe, seed: int, strengths: list[float]) -> None:
    prompts = shapes.grammar_prompts()
    colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
    source = pipe.generate([p["prompt"] for p in prompts], guidance=DEFAULT_GUIDANCE, seed=seed, progress=False).pixels
    read = [analyser.analyse(x) for x in source]
    others = []
    for p in prompts:
        c = colours[(colours.index(p["colour"]) + 1) % len(colours)]
        s = kinds[(kinds.index(p["shape"]) + 1) % len(kinds)]
        others.append(shapes._one(c, s, p["position"]))
    rows = []
    for strength in strengths:
        new = pipe.generate([o["prompt"] for o in others], image=source, strength=strength,
                            guidance=DEFAULT_GUIDANCE, seed=seed + 1, progress=False).pixels
        same = pipe.generate([p["prompt"] for p in prompts], image=source, strength=strength,
                             guidance=DEFAULT_GUIDANCE, seed=seed + 1, progress=False).pixels
        follows = [(g := analyser.analyse(x))["colour"] == o["colour"] and g["shape"] == o["shape"]
                   for x, o in zip(new, others)]
        kept = [(g := analyser.analyse(x))["colour"] == r["colour"] and g["shape"] == r["shape"]
                and g["position"] == r["position"] for x, r in zip(same, read)]
        change = (new - source).abs().mean().item()
        rows.append([f"{strength:g}", pct(sum(follows) / len(follows)), pct(sum(kept) / len(kept)), f"{change:.3f}"])
    print(f"img2img from the {len(prompts)} one-object pictures (guidance {DEFAULT_GUIDANCE:g}, "
          f"{pipe.default_sampler} {pipe.default_steps} steps × strength):")
    table(["strength", "re-prompted: follows the new prompt", "same prompt: colour, shape, position kept",
           "mean |Δpixel| re-prompted"], rows)


def speed(pipe, repeats: int) -> None:
    times = {}
    for n in (None, 1, 2):
        with environment(ENV_THREADS, None if n is None else str(n)):
            pipe.generate("a red circle on the left", seed=0, progress=False)
            runs = []
            for i in range(repeats):
                t0 = time.perf_counter()
                pipe.generate("a red circle on the left", seed=i, progress=False)
                runs.append(time.perf_counter() - t0)
            times["sdlearn's choice" if n is None else f"{n} thread{'s' if n > 1 else ''}"] = runs
    h, w = pipe.native_size
    print(f"one {h}×{w} image, {pipe.default_sampler} {pipe.default_steps} steps, guidance {DEFAULT_GUIDANCE:g}, "
          f"float32, median of {repeats} (sdlearn's choice: {pipe.cpu_threads} thread(s)):")
    for label, runs in times.items():
        print(f"  {label}: {statistics.median(runs):.3f} s   ({', '.join(f'{x:.3f}' for x in runs)})")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_PATH), help="a tiny-model file (default: the shipped one)")
    parser.add_argument("--only", default="samplers,seeds,pndm,windows,stiffness,exact,held_out,pairs,img2img,speed")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5, 10.0])
    parser.add_argument("--strength", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--more-seeds", type=int, nargs="+", default=[1, 2],
                        help="for the seeds, pndm, windows and exact tables")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    pipe = load_pipeline(args.model, device="cpu", dtype=torch.float32)
    size = Path(args.model).stat().st_size / 1e6
    print(f"{args.model} ({size:.1f} MB): {pipe.default_sampler} {pipe.default_steps} steps; torch {torch.__version__}\n"
          f"{TARGETS}\n", flush=True)
    pipe.generate(["a red circle"] * 4, seed=0, progress=False)          # warm-up
    only = set(args.only.split(","))
    if "samplers" in only:
        samplers(pipe, args.seed)
    if "seeds" in only:
        seeds(pipe, args.seed, args.more_seeds)
    if "pndm" in only:
        pndm(pipe, args.seed, args.more_seeds)
    if "windows" in only:
        windows(pipe, args.seed, args.more_seeds)
    if "stiffness" in only:
        stiffness(pipe, args.model, args.seed)
    if "exact" in only:
        exact(pipe, args.model, args.seed, args.more_seeds)
    if "held_out" in only:
        held_out(pipe, args.seed)
    if "pairs" in only:
        pairs(pipe, args.seed, sorted(set(args.guidance) | {DEFAULT_GUIDANCE}))
    if "img2img" in only:
        img2img(pipe, args.seed, args.strength)
    if "speed" in only:
        speed(pipe, args.repeats)


if __name__ == "__main__":
    main()
