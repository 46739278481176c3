"""The README's figures, made from the package (`make figures`, or `python -m sdlearn.figures DIR`).

    schedules.png       ᾱ_t of the three noise schedules, and SD's 50 "leading" timesteps
    tiny_samples.png    the shipped tiny model on prompts of its grammar (one seed each)
    attention.png       which word paints which pixels: per-word cross-attention maps
    filmstrip.png       x̂₀ along a 20-step DDIM trajectory

Every figure is deterministic (fixed seeds, the CPU), so re-running changes nothing unless the
package or the model changed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import torch

from .pipeline import load_pipeline
from .samplers import get_sampler
from .schedule import NoiseSchedule
from .viz import image_grid, plot_schedules, plot_word_maps


def schedules(out: Path) -> Path:

    fig = plot_schedules({"linear (DDPM)": NoiseSchedule.linear(), "scaled_linear (SD v1)": NoiseSchedule.scaled_linear(),
                          "cosine": NoiseSchedule.cosine()}, ("alphas_cumprod", "log_snr"))
    sampler = get_sampler("ddim", NoiseSchedule.scaled_linear())
    sampler.set_timesteps(50)
    ax = fig.axes[0]
    abar = NoiseSchedule.scaled_linear().alphas_cumprod
    ax.plot(sampler.timesteps, abar[sampler.timesteps], "k.", ms=3, label="SD's 50 steps")
    ax.legend(fontsize=7)
    return _save(fig, out / "schedules.png")


def tiny_samples(out: Path, pipe) -> Path:

    prompts = ["a red circle on the left", "a large blue square", "a green triangle at the top",
               "a yellow circle at the bottom", "a small purple square on the right", "an orange triangle in the center",
               "a purple circle", "a blue triangle on the left"]
    result = pipe.generate(prompts, seed=0, progress=False)
    return _save(image_grid(result.images, prompts, ncols=8, size=1.3), out / "tiny_samples.png")


def attention(out: Path, pipe) -> Path:

    prompt = "a large red circle on the left"
    result = pipe.generate(prompt, seed=1, attention_maps=True, progress=False)
    return _save(plot_word_maps(result.images[0], result.attention_maps[0]), out / "attention.png")


def filmstrip(out: Path, pipe) -> Path:

    frames, labels = [], []

    def keep(info):
        if info.step % 4 == 3 or info.step == 0:
            frames.append(pipe.decode(info.x0_hat)[0])
            labels.append(f"step {info.step + 1}: x̂₀")

    result = pipe.generate("a yellow triangle on the right", seed=2, steps=20, sampler="ddim", callback=keep,
                           progress=False)
    frames.append(result.pixels[0])
    labels.append("final")
    return _save(image_grid(frames, labels, ncols=len(frames), size=1.2), out / "filmstrip.png")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt   # here, after main() chose the Agg backend

    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    matplotlib.use("Agg")

    out = Path((argv or sys.argv[1:] or ["figures"])[0])
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        schedules(out)
        pipe = load_pipeline("tiny", device="cpu")
        tiny_samples(out, pipe)
        attention(out, pipe)
        filmstrip(out, pipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
