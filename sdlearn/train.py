"""Training the tiny model: the VAE first, then the UNet together with its text encoder.

    sdlearn train vae    --out runs/tiny --steps 1500      # reconstruction + small KL
    sdlearn train unet   --out runs/tiny --steps 4000      # ε-prediction, caption dropout
    sdlearn train export runs/tiny sdlearn/data/tiny.safetensors          (sdlearn/export.py)
    sdlearn train history runs/tiny    # → sdlearn/data/tiny_training_log.json (sdlearn/runlog.py)
    torchrun --nproc_per_node 2 -m sdlearn.train unet --out runs/tiny    # several processes (sdlearn/distributed.py)

Stage 1, the VAE (Rombach et al. 2022, §3 and appendix G, without the GAN and LPIPS terms):

    x̂ = D(z),  z = μ + σ·ε  with (μ, log σ²) = E(x),     minimising `vae_loss` (L1, L2, edges, KL)

  then the whole dataset is encoded once, and the latent scale is *measured*: scaling_factor =
  1 / std(z) over the dataset (SD v1 did the same and got 0.18215), stored in the run's
  config.json, so the diffusion model sees latents of unit variance.

Stage 2, the UNet and a CLIP-architecture text encoder trained from scratch on the real
tokenizer (Ho et al. 2020, Algorithm 1; classifier-free guidance as Ho & Salimans 2022):

    z₀ = s · (μ + σ·ε′),  t ~ U{0 … 999},  ε ~ N(0, I),  c = CLIP(caption or "": `caption_dropout`)
    minimising `noise_prediction_loss`  ‖ε − ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, c)‖²

  with SD v1's scaled_linear schedule. With `caption_noise` p, a share p of the captions have one
  thing wrong (`shapes.mistake`), as web captions do: the shipped model's last 2,000 steps used
  0.3, which is what makes guidance matter for it (README, "The tiny model").

Both stages use AdamW with a linear warm-up, an EMA of the weights (the EMA weights are what
gets exported), gradient clipping, periodic checkpoints (model, EMA, optimizer, step, RNG
state) and `--resume`. The batch of step k is drawn from a generator seeded with (seed, k), so
a resumed run continues exactly as an uninterrupted one would, and N processes compute what one
process computes (sdlearn/distributed.py).

A run folder holds config.json (the ModelConfig), vae.pt, latents.pt, unet.pt, log.jsonl (losses
and evaluations, one JSON object per line) and samples-*.png (the evaluation prompts' images).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm          # a text bar: it reads the same in a terminal, a log and a saved notebook

from . import analyser, shapes
from .clip import CLIPTextModel
from .configs import ModelConfig
from .distributed import Dist, init_distributed, step_generator
from .export import evaluate_alignment, export, training_pipeline
from .runlog import TINY_HISTORY, append_log, write_training_history
from .preview import LatentPreview
from .schedule import NoiseSchedule
from .tokenizer import default_tokenizer
from .unet import UNet
from .vae import AutoencoderKL

TRACE_ENV = "SDLEARN_TRACE_WEIGHTS"   # a folder: every process saves its weights after every step there


# --------------------------------------------------------------------------------- settings

@dataclass
class Settings:
    """Everything a stage needs besides the model config. CLI flags have the same names."""
    steps: int = 1500
    batch: int = 32                  # global batch: split across processes
    lr: float = 5e-4
    warmup: int = 100                # steps of linear learning-rate warm-up
    weight_decay: float = 0.01       # on matrices and kernels only
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    images: int = 20_000             # dataset size
    two_shapes: float = 0.4          # share of pictures with two shapes
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 10
    # stage vae
    kl_weight: float = 1e-4
    l2_weight: float = 1.0
    edge_weight: float = 0.5
    preview_weight: float = 1.0      # keeps each patch's colour linearly in its latent pixel
    peak_weight: float = 0.0         # on the worst pixels of each picture: against specks
    # stage unet
    caption_dropout: float = 0.1     # P(caption → ""), which teaches the unconditional ε for CFG
    captions_per_image: int = 4      # the dataset's caption plus re-worded variants
    caption_noise: float = 0.0       # P(a caption has one thing wrong: shapes.mistake), as web captions do
    eval_every: int = 0              # 0: evaluate only at the end
    eval_steps: int = 20             # sampler steps per evaluation image; 0: no evaluation
    eval_guidance: float = 7.5         # the default guidance of generate


STAGE_DEFAULTS = {
    "vae": dict(steps=1500, batch=32, lr=5e-4, warmup=100, ema_decay=0.995),
    "unet": dict(steps=4000, batch=128, lr=5e-4, warmup=200),
}


def resolve_config(name: str) -> ModelConfig:
    """"tiny", "micro", or a path to a JSON file holding ModelConfig.to_dict()."""
    if name == "tiny":
        return ModelConfig.tiny()
    if name == "micro":
        return ModelConfig.micro()
    path = Path(name)
    if not path.exists():
        raise ValueError(f"config {name!r}: expected 'tiny', 'micro' or a JSON file of ModelConfig.to_dict()")
    return ModelConfig.from_dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------------- EMA, checkpoints

class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ, with d = min(decay, (1 + k) / (10 + k)) at step k so the
    average does not drag the random initial weights along for thousands of steps."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.weights = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            self.weights[k].lerp_(v.detach().float(), 1 - d)

    def copy_to(self, module: nn.Module) -> nn.Module:
        module.load_state_dict(self.weights)
        return module


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (a crash mid-write never leaves a broken checkpoint)."""
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------- the loop

def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _fit(stage: str, model: nn.Module, loss_fn: Callable, s: Settings, dist: Dist, out: Path,
         config: ModelConfig, resume: bool, evaluate: Callable | None = None) -> dict[str, Any]:
    """The loop both stages share. `loss_fn(net, step) → (loss, {name: value})` where `net` is
    the (possibly DDP-wrapped) model; `evaluate(ema_model, step)` runs on the main process.
    With $SDLEARN_TRACE_WEIGHTS set to a folder, every process saves its weights there after
    every step, as {stage}-{step}-rank{rank}.pt (tests/test_train_ddp.py compares them)."""
    path = out / f"{stage}.pt"
    trace = Path(os.environ[TRACE_ENV]) if os.environ.get(TRACE_ENV) else None
    opt = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.999))
    ema = EMA(model, s.ema_decay)
    start, run_parts = 0, [{"from_step": 0, "settings": dataclasses.asdict(s)}]
    if resume:
        ckpt = load_checkpoint(path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.weights = {k: v.float() for k, v in ckpt["ema"].items()}
        start = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        # each resumed part with other settings than --steps keeps its own (a checkpoint from before
        # parts were kept: one part), so that the exported file says which settings made which steps
        run_parts = ckpt.get("parts", [{"from_step": 0, "settings": ckpt["settings"]}])
        if {**dataclasses.asdict(s), "steps": None} != {**run_parts[-1]["settings"], "steps": None}:
            run_parts = run_parts + [{"from_step": start, "settings": dataclasses.asdict(s)}]
        else:
            run_parts[-1]["settings"] = dataclasses.asdict(s)
    net = model
    if dist.world > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def checkpoint(step: int) -> None:
        if dist.main:
            save_checkpoint(path, {"stage": stage, "step": step, "model": model.state_dict(), "ema": ema.weights,
                                   "optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()},
                                   "settings": dataclasses.asdict(s), "parts": run_parts, "config": config.to_dict()})
        dist.barrier()

    # In a terminal the bar redraws ten times a second; into a file or a notebook, once every
    # 2 s, so a saved log or notebook holds a few lines of it, not thousands.
    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc=stage, disable=not dist.main,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 2.0)
    tick, last = time.perf_counter(), start
    model.train()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = s.lr * min(1.0, (step + 1) / max(s.warmup, 1))
        loss, parts = loss_fn(net, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        ema.update(model, step)
        done = step + 1
        if trace is not None:
            torch.save(model.state_dict(), trace / f"{stage}-{done}-rank{dist.rank}.pt")
        if done % s.log_every == 0 or done == s.steps:
            now = time.perf_counter()
            record = {"stage": stage, "step": done, "loss": dist.mean(loss.item()),
                      **{k: dist.mean(v) for k, v in parts.items()}, "grad_norm": float(grad_norm),
                      "lr": opt.param_groups[0]["lr"], "sec_per_step": (now - tick) / (done - last)}
            tick, last = now, done
            if dist.main:
                append_log(out, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if done % s.checkpoint_every == 0 or done == s.steps:
            checkpoint(done)
        if evaluate is not None and ((s.eval_every and done % s.eval_every == 0) or done == s.steps):
            if dist.main:
                evaluate(ema.copy_to(copy.deepcopy(model)).eval(), done)
            dist.barrier()
    bar.close()
    if start >= s.steps and dist.main:
        print(f"{stage}: {path} is already at step {start} ≥ --steps {s.steps}; nothing to do", file=sys.stderr)
    return {"model": model, "ema": ema, "step": max(start, s.steps)}


def _prepare(stage: str, out: Path, settings: dict[str, Any], resume: bool) -> Settings:
    """Settings = stage defaults, overridden by a resumed checkpoint's, overridden by `settings`."""
    path = out / f"{stage}.pt"
    if path.exists() and not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue that run (to a larger --steps), "
                              f"or choose another --out")
    if resume and not path.exists():
        raise FileNotFoundError(f"--resume: {path} does not exist; run without --resume to start the stage")
    saved = load_checkpoint(path)["settings"] if resume else {}
    return Settings(**{**STAGE_DEFAULTS[stage], **saved, **settings})


def _dataset(s: Settings, dist: Dist, cache_dir: str | Path | None) -> shapes.ShapeDataset:
    """The training pictures; the main process draws (and caches) them first."""
    return dist.main_first(lambda: shapes.make_dataset(s.images, s.seed, two_shapes=s.two_shapes,
                                                       cache_dir=cache_dir))


def _to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


# --------------------------------------------------------------------------------- stage 1: VAE

class Reconstruction(nn.Module):
    """x → (x̂, KL per image, preview) with z = μ + σ·ε for a given ε: the VAE's training forward
    pass. `preview` is a 1×1 linear map of z to RGB, trained to give each latent pixel's patch
    colour (the preview term of `vae_loss`); it keeps the colour of a patch in the latent, linearly,
    which makes previews of intermediate latents meaningful. (B, 3, H, W), (B, 4, h, w) →
    (B, 3, H, W), (B,), (B, 3, h, w)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.preview = nn.Conv2d(vae.config.latent_channels, 3, 1)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * eps
        return self.vae.decode(z), posterior.kl(), self.preview(z)


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


PEAK_PIXELS = 16    # the worst pixels per picture that the peak term of vae_loss averages


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, kl: torch.Tensor, latent_numel: int,
             s: Settings, preview: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The VAE's loss: reconstruction, edges, a small KL towards N(0, I), and the preview term.

        L_vae = |x − x̂|₁ + λ₂ ‖x − x̂‖² + λ_edge |∇x − ∇x̂|₁ + λ_KL · KL(N(μ, σ²) ‖ N(0, I)) / dim z
                + λ_preview ‖P z − pool_f(x)‖² + λ_peak · mean of the k = 16 largest |x − x̂| per image

    Every term a mean per element; ∇ the differences between vertical neighbours and between
    horizontal ones (a mean each, summed); `kl` (B,) is summed over each latent, hence / dim z;
    P z (`preview`, (B, 3, h, w)) a linear map of each latent pixel, pool_f(x) the mean colour of
    its f×f patch. The peak term (pixel errors summed over the colour channels) punishes what a
    mean hardly sees: a decoder that paints a few wrong pixels, a speck or a dot, into otherwise
    good pictures. x̂, x (B, 3, H, W), kl (B,) → (loss, {"l1", "l2", "edge", "kl", "preview", "peak"})."""
    l1 = (x_hat - x).abs().mean()
    l2 = (x_hat - x).square().mean()
    edge = sum((a - b).abs().mean() for a, b in zip(_edges(x_hat), _edges(x)))
    kl = kl.mean() / latent_numel
    loss = l1 + s.l2_weight * l2 + s.edge_weight * edge + s.kl_weight * kl
    parts = {"l1": l1.item(), "l2": l2.item(), "edge": edge.item(), "kl": kl.item()}
    if s.peak_weight:
        peak = (x_hat - x).abs().sum(1).flatten(1).topk(PEAK_PIXELS, dim=1).values.mean()
        loss = loss + s.peak_weight * peak
        parts["peak"] = peak.item()
    if preview is not None:
        target = F.avg_pool2d(x, x.shape[-1] // preview.shape[-1])
        parts["preview"] = (preview - target).square().mean()
        loss = loss + s.preview_weight * parts["preview"]
        parts["preview"] = parts["preview"].item()
    return loss, parts


def train_vae(out: str | Path, *, config: ModelConfig | str = "tiny", resume: bool = False,
              device: str | None = None, data_cache: str | Path | None = ".cache/shapes",
              **settings) -> dict[str, Any]:
    """Stage 1. Trains (or resumes) the VAE in `out`, then encodes the dataset with the EMA
    weights, measures scaling_factor = 1/std(z) and writes config.json and latents.pt.
    Returns the measurements ({"l1", "latent_mean", "latent_std", "scaling_factor", …})."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dist = init_distributed(device)
    s = _prepare("vae", out, settings, resume)
    if resume:
        config = ModelConfig.from_dict(load_checkpoint(out / "vae.pt")["config"])
    elif isinstance(config, str):
        config = resolve_config(config)
    part = dist.part(s.batch)                # this process's rows of the global batch
    data = _dataset(s, dist, data_cache)
    torch.manual_seed(s.seed)
    vae = AutoencoderKL(config.vae).to(dist.device)
    f = config.vae.downsample_factor
    latent_shape = (config.vae.latent_channels, data.images.shape[2] // f, data.images.shape[3] // f)
    images = data.images.to(dist.device)

    def loss_fn(net, step):
        g = step_generator(s.seed, step)
        idx = torch.randint(len(images), (s.batch,), generator=g)[part].to(dist.device)
        eps = torch.randn((s.batch, *latent_shape), generator=g)[part].to(dist.device)
        x = _to_pixels(images[idx])
        x_hat, kl, preview = net(x, eps)
        return vae_loss(x_hat, x, kl, math.prod(latent_shape), s, preview)

    model = Reconstruction(vae)
    fit = _fit("vae", model, loss_fn, s, dist, out, config, resume)
    result = {}
    if dist.main:
        ema_vae = fit["ema"].copy_to(copy.deepcopy(model)).vae.eval()
        result = measure_vae(ema_vae, data.images, s, dist.device)
        config = config.replace(vae=config.vae.replace(scaling_factor=result["scaling_factor"]))
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        torch.save({"vae_step": fit["step"], "mean": result.pop("_mean"), "std": result.pop("_std")},
                   out / "latents.pt")
        append_log(out, {"stage": "vae", "step": fit["step"], "measure": result})
    dist.barrier()
    return result


@torch.no_grad()
def encode_dataset(vae: nn.Module, images: torch.Tensor, device: torch.device,
                   batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) → the posterior's μ and σ, each (N, 4, h, w) float32 on the CPU."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(_to_pixels(images[i:i + batch].to(device)))
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def measure_vae(vae: nn.Module, images: torch.Tensor, s: Settings, device: torch.device) -> dict[str, Any]:
    """Encode every training image; the latent scale is 1/std of z = μ + σ·ε over all of them.

    On up to 512 fresh single-shape pictures the VAE never saw: the reconstruction error (from μ),
    how often the analyser still reads the right colour, shape and position from the
    reconstruction (the ceiling of what the diffusion model can reach through this decoder), and
    the error of a linear latent preview fitted on them."""
    mean, std = encode_dataset(vae, images, device)
    g = torch.Generator().manual_seed(s.seed)
    z = mean + std * torch.randn(mean.shape, generator=g)
    unseen = shapes.make_dataset(min(512, s.images), s.seed + 1, two_shapes=0.0)
    x = _to_pixels(unseen.images.to(device))
    x_hat = torch.cat([vae.decode(vae.encode(x[i:i + 128]).mean) for i in range(0, len(x), 128)])
    read = analyser.score_alignment(list((x_hat.clamp(-1, 1) + 1) / 2), [a["shapes"][0] for a in unseen.attributes])
    preview = LatentPreview.fit(vae, x[:256])              # how well a linear map previews the latents
    return {"l1": (x_hat - x).abs().mean().item(), **{f"recon_{k}": v for k, v in read.items()},
            "preview_rmse": preview.rmse,
            "latent_mean": z.mean().item(), "latent_std": z.std().item(), "posterior_std": std.mean().item(),
            "scaling_factor": 1.0 / z.std().item(), "_mean": mean, "_std": std}


# --------------------------------------------------------------------------------- stage 2: UNet

class TextToNoise(nn.Module):
    """The pair stage 2 trains: ε_θ(z_t, t, CLIP(ids)). (B, 4, h, w), (B,), (B, 77) → (B, 4, h, w)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.text_encoder.hidden_size != config.unet.cross_attention_dim:
            raise ValueError(f"the text encoder's width ({config.text_encoder.hidden_size}) must equal the UNet's "
                             f"cross_attention_dim ({config.unet.cross_attention_dim})")
        self.text_encoder = CLIPTextModel(config.text_encoder)
        self.unet = UNet(config.unet)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, self.text_encoder(ids))


def caption_ids(data: shapes.ShapeDataset, s: Settings) -> torch.Tensor:
    """Token ids (N, K, 77) of K captions per picture: the dataset's own, then K−1 re-wordings
    drawn from `default_rng([seed, i, k])`, so the model sees each picture described several ways.
    With `caption_noise` p > 0 each of the K is, with probability p (its own draw from
    `default_rng([seed, i, k, 1])`), a caption of `shapes.mistake(...)` instead: loose captions."""
    texts = []
    for i, (own, attrs) in enumerate(zip(data.captions, data.attributes)):
        for k in range(s.captions_per_image):
            noise = np.random.default_rng([s.seed, i, k, 1])
            if s.caption_noise > 0 and noise.random() < s.caption_noise:
                wrong = shapes.mistake(attrs["shapes"], noise)
                texts.append(shapes.caption(wrong, np.random.default_rng([s.seed, i, k])))
            else:
                texts.append(own if k == 0 else shapes.caption(attrs["shapes"], np.random.default_rng([s.seed, i, k])))
    return default_tokenizer()(texts).view(len(data.captions), s.captions_per_image, -1)


def caption_dropout(ids: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each caption replaced by the empty one with probability p: u_i ~ U[0, 1) from `generator`,
    row i → `empty` where u_i < p. Trains the unconditional ε_θ(z_t, t, CLIP("")) that
    classifier-free guidance needs, in the same network (Ho & Salimans 2022, Algorithm 1).
    ids (B, 77), empty (1, 77) → (B, 77)."""
    drop = torch.rand(len(ids), generator=generator) < p
    return torch.where(drop[:, None], empty, ids)


def noise_prediction_loss(eps_model: Callable, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                          cond: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The diffusion loss (Ho et al. 2020, Algorithm 1): noise z₀ to step t, predict the noise.

        z_t = √ᾱ_t z₀ + √(1 − ᾱ_t) ε,   L = ‖ε − ε_θ(z_t, t, c)‖²   (a mean per element)

    z0, noise (B, 4, h, w), t (B,) indices into the schedule, cond: what eps_model takes as c."""
    z_t = schedule.q_sample(z0, t, noise)
    return F.mse_loss(eps_model(z_t, t.to(z0.device), cond), noise)


def train_unet(out: str | Path, *, config: ModelConfig | str | None = None, resume: bool = False,
               device: str | None = None, data_cache: str | Path | None = ".cache/shapes",
               **settings) -> dict[str, Any]:
    """Stage 2. Needs stage 1's config.json and latents.pt in `out`. `config` may replace the
    text encoder and UNet sizes (the VAE and its measured scale stay those of the run).
    Returns the last evaluation's scores."""
    out = Path(out)
    if not (out / "config.json").exists() or not (out / "latents.pt").exists():
        raise FileNotFoundError(f"{out} has no config.json / latents.pt: run `sdlearn train vae --out {out}` first")
    dist = init_distributed(device)
    s = _prepare("unet", out, settings, resume)
    run_config = ModelConfig.from_dict(json.loads((out / "config.json").read_text()))
    if resume:
        run_config = ModelConfig.from_dict(load_checkpoint(out / "unet.pt")["config"])
    elif config is not None:
        other = resolve_config(config) if isinstance(config, str) else config
        run_config = run_config.replace(text_encoder=other.text_encoder, unet=other.unet)
    part = dist.part(s.batch)                # this process's rows of the global batch
    data = _dataset(s, dist, data_cache)
    latents = torch.load(out / "latents.pt")
    if len(latents["mean"]) != len(data.images):
        raise ValueError(f"latents.pt holds {len(latents['mean'])} pictures but --images is {len(data.images)}; "
                         "use the VAE stage's --images and --seed")
    mean, std = latents["mean"].to(dist.device), latents["std"].to(dist.device)
    ids, empty = caption_ids(data, s), default_tokenizer()([""])
    scale = run_config.vae.scaling_factor
    schedule = NoiseSchedule.scaled_linear()
    torch.manual_seed(s.seed)
    model = TextToNoise(run_config).to(dist.device)

    def loss_fn(net, step):                  # the global batch, drawn in this order; then this process's rows
        g = step_generator(s.seed, step)
        idx = torch.randint(len(mean), (s.batch,), generator=g)
        which = torch.randint(s.captions_per_image, (s.batch,), generator=g)
        cond = caption_dropout(ids[idx, which], empty, s.caption_dropout, g)[part].to(dist.device)
        t = torch.randint(schedule.num_train_timesteps, (s.batch,), generator=g)[part]
        eps_z = torch.randn((s.batch, *mean.shape[1:]), generator=g)[part].to(dist.device)
        noise = torch.randn((s.batch, *mean.shape[1:]), generator=g)[part].to(dist.device)
        idx = idx[part].to(dist.device)
        z0 = scale * (mean[idx] + std[idx] * eps_z)           # z₀ = s · (μ + σ·ε′)
        return noise_prediction_loss(net, z0, t, noise, cond, schedule), {}

    scores: dict[str, Any] = {}

    def evaluate(ema_model: TextToNoise, step: int) -> None:
        pipe = training_pipeline(ema_model.text_encoder, ema_model.unet, load_ema_vae(out, run_config, dist.device),
                                 run_config, dist.device)
        result = evaluate_alignment(pipe, steps=s.eval_steps, guidance=(s.eval_guidance, 1.0),
                                    grid=out / f"samples-{step}.png")
        scores.clear()
        scores.update(result)
        append_log(out, {"stage": "unet", "step": step, "eval": result})
        print(f"step {step}: " + "; ".join(f"guidance {g}: " + ", ".join(f"{k} {v:.0%}" for k, v in r.items())
                                          for g, r in result.items()), file=sys.stderr)

    _fit("unet", model, loss_fn, s, dist, out, run_config, resume, evaluate if s.eval_steps > 0 else None)
    return scores


def load_ema_vae(out: Path, config: ModelConfig, device: torch.device) -> nn.Module:
    """Stage 1's EMA weights (vae.pt in the run folder `out`) in an AutoencoderKL, in eval mode."""
    model = Reconstruction(AutoencoderKL(config.vae))
    model.load_state_dict(load_checkpoint(out / "vae.pt")["ema"])
    return model.vae.to(device).eval()


# --------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdlearn train", description="train the tiny model (see sdlearn/train.py)")
    sub = p.add_subparsers(dest="stage", required=True)
    defaults = Settings()
    for stage in ("vae", "unet"):
        q = sub.add_parser(stage, help={"vae": "stage 1: the autoencoder, then the latent scale",
                                        "unet": "stage 2: UNet + text encoder (needs stage 1)"}[stage])
        q.add_argument("--out", required=True, help="run folder (checkpoints, config.json, log.jsonl)")
        q.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint up to --steps")
        q.add_argument("--config", default=None,
                       help="'tiny' (default for vae), 'micro', or a ModelConfig JSON file")
        q.add_argument("--device", default=None, help="cpu, cuda, mps (default: $SDLEARN_DEVICE or the best one)")
        q.add_argument("--data-cache", default=".cache/shapes", help="where the dataset .npz is cached ('' = nowhere)")
        q.add_argument("--threads", type=int, default=None,
                       help="CPU threads per process (on a busy machine, 1 thread × N processes is faster)")
        for f in dataclasses.fields(Settings):
            if stage == "vae" and f.name in ("caption_dropout", "captions_per_image", "caption_noise", "eval_every",
                                             "eval_steps", "eval_guidance"):
                continue
            if stage == "unet" and f.name in ("kl_weight", "l2_weight", "edge_weight", "preview_weight", "peak_weight"):
                continue
            default = STAGE_DEFAULTS[stage].get(f.name, getattr(defaults, f.name))
            q.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=None,
                           help=f"default {default}")
    q = sub.add_parser("export", help="EMA weights → one original-layout .safetensors file")
    q.add_argument("run")
    q.add_argument("path")
    q.add_argument("--dtype", choices=("float32", "float16"), default=None,
                   help="default: float32 if it fits in 25 MB, else float16")
    q.add_argument("--overwrite", action="store_true")
    q = sub.add_parser("history", help="the run's log.jsonl → a compact JSON of losses and evaluations")
    q.add_argument("run")
    q.add_argument("path", nargs="?", default=str(TINY_HISTORY))
    q.add_argument("--every", type=int, default=100, help="steps per averaged loss point (default 100)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`sdlearn train {vae,unet,export,history} …`; also `python -m sdlearn.train …` (and under torchrun)."""
    args = build_parser().parse_args(argv)
    if args.stage == "export":
        path = export(args.run, args.path, dtype=getattr(torch, args.dtype) if args.dtype else None,
                      overwrite=args.overwrite)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.stage == "history":
        path = write_training_history(args.run, args.path, args.every)
        print(f"wrote {path} ({path.stat().st_size / 1e3:.1f} kB)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {f.name for f in dataclasses.fields(Settings)}
    settings = {k: v for k, v in vars(args).items() if k in names and v is not None}
    common = dict(resume=args.resume, device=args.device, data_cache=args.data_cache or None)
    if args.stage == "vae":
        result = train_vae(args.out, config=args.config or "tiny", **common, **settings)
    else:
        result = train_unet(args.out, config=args.config, **common, **settings)
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=1))
    if torch.distributed.is_initialized():
        # Every process waits for the others before tearing down: a process that leaves while a
        # peer's gloo connection is still busy can make that peer abort (seen under heavy load).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
