"""Training a LoRA on the tiny model: a style its data never had, shapes drawn in outline.

The tiny model only ever saw filled shapes. A few hundred pictures of the same grammar drawn
with `shapes.draw(…, style="outline")`, under their usual captions ("a red circle on the
left"), teach it the style as the LoRA's effect: no new word, the LoRA *is* the style.

Only the low-rank factors learn; the model stays frozen. Each step runs the UNet on the fused
weights, built with the same formula `lora.load` uses (one formula for training and use):

    W' = W + (α / r) · B A          A (r, in) ~ N(0, 1/in),  B (out, r) = 0 at the start, so W' = W
    z₀ = s · (μ + σ·ε′),  t ~ U{0 … 999},  z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε,   L = ‖ε − ε_θ'(z_t, t, c)‖²

with c = CLIP(caption), or CLIP("") for 10 % of the rows so that the unconditional half of
classifier-free guidance learns the style too. The result is saved in the kohya format.

    python -m sdlearn.lora_train --out outline.safetensors --evaluate   # trains in 273 s on one thread (loaded machine)
    pipe.load_lora("outline.safetensors")                          # then most shapes are outlined
    pipe.load_lora(OUTLINE_LORA)                                   # the shipped one: 66 % outlined

The shipped file's record, sdlearn/data/lora_outline.json (`evaluate`, written by --evaluate or
--evaluate-only): its training (400 pictures, rank 4, 600 steps, 273 s), `outline_scores` over the
108 grammar prompts at scales 0, 0.5, 1 and 1.5, and the tiny VAE's ceiling (`vae_ceiling`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import analyser, lora, shapes
from .lora import LoRALayer, lora_delta, lora_modules, save_kohya
from .pipeline import load_pipeline
from .schedule import NoiseSchedule
from .train import encode_dataset, noise_prediction_loss

OUTLINE_LORA = Path(__file__).parent / "data" / "lora_outline.safetensors"     # the shipped result

# The UNet layers the style LoRA changes: the attention projections of every transformer block,
# its 1×1 proj_in / proj_out, and the ResBlocks' 3×3 convs (a style is spatial: convs help).
TARGETS = r"attn[12]\.to_(q|k|v|out\.0)$|proj_(in|out)$|resnets\.\d+\.conv[12]$"


def outline_dataset(n: int, seed: int = 0, two_shapes: float = 0.1) -> shapes.ShapeDataset:
    """n pictures of the dataset's grammar with their usual captions, every shape in outline."""
    samples = [shapes.sample(seed, i, two_shapes=two_shapes) for i in range(n)]
    images = np.stack([shapes.draw(s.attributes["shapes"], s.attributes["background"], style="outline")
                       for s in samples]).transpose(0, 3, 1, 2).copy()
    return shapes.ShapeDataset(torch.from_numpy(images), [s.caption for s in samples], [s.attributes for s in samples])


def init_layers(model: nn.Module, targets: str = TARGETS, rank: int = 4, alpha: float | None = None,
                seed: int = 0) -> dict[str, LoRALayer]:
    """A fresh LoRALayer for every layer whose name matches `targets`: down ~ N(0, 1/fan_in),
    up = 0 (ΔW = 0 at the start), both requiring grad."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in lora_modules(model).items():
        if re.search(targets, name):
            w = m.weight
            down = torch.randn((rank, *w.shape[1:]), generator=g) / w[0].numel() ** 0.5
            up = torch.zeros((w.shape[0], rank, *([1, 1] if w.dim() == 4 else [])))
            layers[name] = LoRALayer(down.requires_grad_(), up.requires_grad_(), alpha)
    if not layers:
        raise ValueError(f"no layer name matches targets={targets!r}")
    return layers


def fused_weights(model: nn.Module, layers: dict[str, LoRALayer], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """{"<layer>.weight": W + ΔW} for each LoRA layer, differentiable in down and up: what
    `torch.func.functional_call` runs the model with."""
    return {f"{name}.weight": model.get_submodule(name).weight + lora_delta(l.down, l.up, l.alpha, scale)
            .view_as(model.get_submodule(name).weight) for name, l in layers.items()}


def training_step(unet: nn.Module, layers: dict[str, LoRALayer], z0: torch.Tensor, context: torch.Tensor,
                  schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """The diffusion loss of the UNet with the LoRA fused in, on one batch (z0 (B, 4, h, w),
    context (B, 77, width)): a random timestep and noise per row, ‖ε − ε_θ'(z_t, t, c)‖²."""
    t = torch.randint(schedule.num_train_timesteps, (len(z0),), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    weights = fused_weights(unet, layers)
    eps_model = lambda z_t, t, c: torch.func.functional_call(unet, weights, (z_t, t, c))
    return noise_prediction_loss(eps_model, z0, t, noise, context, schedule)


def train(pipe, *, images: int = 400, steps: int = 600, batch: int = 16, rank: int = 4, lr: float = 3e-3,
          targets: str = TARGETS, caption_drop: float = 0.1, seed: int = 0,
          log_every: int = 100) -> tuple[dict[tuple[str, str], LoRALayer], dict]:
    """Train the outline-style LoRA on the pipeline's UNet (frozen); returns ({("unet", layer):
    LoRALayer}, a log with the losses and the time). AdamW on down and up only."""
    start = time.perf_counter()
    data = outline_dataset(images, seed)
    with torch.no_grad():
        mean, std = encode_dataset(pipe.vae, data.images, pipe.device)
        context = pipe.encode_prompts(data.captions)                   # the text encoder stays frozen
        empty = pipe.encode_prompts([""])
    scale, schedule = pipe.vae.scaling_factor, NoiseSchedule.scaled_linear()
    layers = init_layers(pipe.unet, targets, rank, seed=seed)
    params = [p for layer in layers.values() for p in (layer.down, layer.up)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(images, (batch,), generator=g)
        z0 = scale * (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g))
        dropped = torch.rand(batch, generator=g) < caption_drop           # CLIP("") for these rows
        c = torch.where(dropped[:, None, None], empty, context[idx])
        loss = training_step(pipe.unet, layers, z0, c, schedule, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}", file=sys.stderr)
    trained = {("unet", name): LoRALayer(l.down.detach(), l.up.detach(), l.alpha) for name, l in layers.items()}
    return trained, {"losses": losses, "seconds": time.perf_counter() - start, "images": images, "steps": steps,
                     "batch": batch, "rank": rank, "lr": lr, "targets": targets, "seed": seed}


# ----------------------------------------------------------------------------------- measuring

def outline_scores(pipe, prompts: list[dict] | None = None, *, guidance: float = 5.0, seed: int = 0) -> dict[str, float]:
    """Generate each prompt once (default: the 108 grammar prompts) and measure how often the
    shape is drawn in outline (`analyser.outlined`), and whether its colour and position are the
    ones asked for (`analyser.score_alignment`)."""
    prompts = shapes.grammar_prompts() if prompts is None else prompts
    pixels = pipe.generate([p["prompt"] for p in prompts], guidance=guidance, seed=seed, progress=False).pixels
    scores = analyser.score_alignment(list(pixels), prompts)
    return {"outlined": float(np.mean([analyser.outlined(x) for x in pixels])),
            "colour": scores["colour"], "position": scores["position"]}


def vae_ceiling(pipe, images: int = 108, seed: int = 0) -> dict[str, float]:
    """How many real outline pictures (`outline_dataset`) the analyser reads as outlined, as drawn
    and after the VAE's encode and decode (from μ): the most a LoRA drawing through this decoder
    can reach."""
    data = outline_dataset(images, seed)
    with torch.no_grad():
        mean, _ = encode_dataset(pipe.vae, data.images, pipe.device)
        pixels = pipe.decode(mean * pipe.vae.scaling_factor)
    drawn = data.images.permute(0, 2, 3, 1).numpy()
    return {"images": images, "seed": seed, "drawn": float(np.mean([analyser.outlined(x) for x in drawn])),
            "through_vae": float(np.mean([analyser.outlined(x) for x in pixels]))}


def evaluate(pipe, path: str | Path = OUTLINE_LORA, scales: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5), *,
             guidance: float = 5.0, seed: int = 0, ceiling_images: int = 108) -> dict:
    """The record of a trained LoRA file: its training (from the file's metadata), `outline_scores`
    over the 108 grammar prompts at each scale (0: without it), and the VAE's ceiling."""
    if lora.loaded(pipe):
        raise ValueError("evaluate needs a pipeline without LoRAs; call pipe.unload_lora() first")
    start = time.perf_counter()
    sweep = {}
    for scale in scales:
        if scale:
            pipe.load_lora(path, scale)
        try:
            sweep[f"{scale:g}"] = outline_scores(pipe, guidance=guidance, seed=seed)
        finally:
            pipe.unload_lora()
        print(f"scale {scale:g}: {sweep[f'{scale:g}']}", file=sys.stderr)
    return {"file": Path(path).name, "training": training_record(lora.read(path).metadata),
            "evaluation": {"prompts": len(shapes.grammar_prompts()), "guidance": guidance, "seed": seed},
            "sweep": sweep, "vae_ceiling": vae_ceiling(pipe, ceiling_images),
            "seconds": round(time.perf_counter() - start, 1),
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_average_1min_at_end": round(os.getloadavg()[0], 2)}}


def training_record(metadata: dict[str, str]) -> dict:
    """A LoRA file's metadata → {"command", "settings", "seconds", "final_loss"}. The settings are
    the file's own `settings` JSON or, in files from before it existed, its command parsed by this
    CLI (defaults filled in)."""
    command = metadata.get("command", "")
    if "settings" in metadata:
        settings = json.loads(metadata["settings"])
    else:
        args = parser().parse_args(command.split()[3:])       # after "python -m sdlearn.lora_train"
        settings = {k: getattr(args, k) for k in ("images", "steps", "batch", "rank", "lr", "seed")}
    return {"command": command, "settings": settings, "seconds": float(metadata.get("training_seconds", "nan")),
            "final_loss": float(metadata.get("final_loss", "nan"))}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdlearn.lora_train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the kohya-format .safetensors file to write")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", action="store_true",
                        help="then measure the file (`evaluate`) and write the record next to it (.json)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file and its .json record")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="no training: measure the existing --out file and write its record")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out, record_path = Path(args.out), Path(args.out).with_suffix(".json")
    if not args.evaluate_only:          # refuse before training, not after it
        existing = [p for p in (out, record_path) if p.exists()]
        if existing and not args.force:
            print(f"{' and '.join(map(str, existing))} already exist: pass --force to replace, or choose another --out",
                  file=sys.stderr)
            return 2
    torch.set_num_threads(1)
    pipe = load_pipeline("tiny", device="cpu")
    command = "python -m sdlearn.lora_train " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.evaluate_only:
        layers, log = train(pipe, images=args.images, steps=args.steps, batch=args.batch, rank=args.rank,
                            lr=args.lr, seed=args.seed)
        settings = {k: log[k] for k in ("images", "steps", "batch", "rank", "lr", "seed", "targets")}
        meta = {"sdlearn_lora": "outline style for the tiny model", "command": command,
                "settings": json.dumps(settings), "training_seconds": f"{log['seconds']:.0f}",
                "final_loss": f"{np.mean(log['losses'][-50:]):.4f}"}
        print(f"trained in {log['seconds']:.0f} s; loss {meta['final_loss']}", file=sys.stderr)
        partial = out.with_name(out.stem + ".partial" + out.suffix)   # the old file stays until the new one is whole
        partial.unlink(missing_ok=True)
        save_kohya(partial, layers, metadata=meta)
        partial.replace(out)
        record_path.unlink(missing_ok=True)          # it described the file just replaced
    if args.evaluate or args.evaluate_only:
        record = {"command": command, **evaluate(pipe, args.out)}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record["sweep"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
