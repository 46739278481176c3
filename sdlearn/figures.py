"""The README's figures, made from the package (`make figures`, or `python -m sdlearn.figures DIR`).

    schedules.png       ᾱ_t of the three noise schedules, and SD's 50 "leading" timesteps
    tiny_samples.png    the shipped tiny model on prompts of its grammar (one seed each)
    attention.png       which word paints which pixels: per-word cross-attention maps
    filmstrip.png       x̂₀ along a 20-step DDIM trajectory

`pipeline_diagram()` draws the whole pipeline with the shapes on each arrow (notebook 00).

Every figure is deterministic (fixed seeds, the CPU), so re-running changes nothing unless the
package or the model changed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import torch

from .configs import ModelConfig
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


def pipeline_shapes(config) -> dict[str, tuple[int, ...]]:
    """The tensor shapes between the stages of one text-to-image run (one prompt, one image, at the
    model's native size), from a ModelConfig: token ids, text embeddings, latents, picture."""
    tokens = config.text_encoder.max_position_embeddings
    side = config.unet.sample_size
    factor = 2 ** (len(config.vae.block_out_channels) - 1)
    return {"tokens": (1, tokens), "text": (1, tokens, config.text_encoder.hidden_size),
            "latents": (1, config.vae.latent_channels, side, side), "picture": (1, 3, side * factor, side * factor)}


def pipeline_diagram(tiny=None, *, steps: int = 50):
    """prompt → tokenizer → text encoder → UNet loop with the sampler → VAE decoder → picture, with
    the SD v1.5 shapes on each arrow and, in brackets, those of `tiny` (a ModelConfig; default
    ModelConfig.tiny(), the model that ships with the package). Returns the Figure."""
    import matplotlib.pyplot as plt   # as in viz.py: importing pyplot picks a backend, so not at import time
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    big, small = pipeline_shapes(ModelConfig.sd15()), pipeline_shapes(tiny or ModelConfig.tiny())

    def shape(key):
        return f"{big[key]}", f"tiny: {small[key]}"

    specs = [  # (width, title, what it is, notebook, colour)
        (1.3, '"a red circle\non the left"', "the prompt", "", "#ffffff"),
        (1.3, "tokenizer", "BPE → ids, pad to 77", "02", "#e8f1fb"),
        (1.4, "text encoder", "CLIP transformer", "02", "#e8f1fb"),
        (1.9, "UNet  ⟳  sampler", f"predict ε, step z_t → z_t−1\n× {steps} steps", "03 · 04 · 06", "#fdf0e0"),
        (1.3, "VAE decoder", "latents → pixels", "05", "#eaf6ea"),
        (0.9, "picture", "RGB", "", "#ffffff"),
    ]
    gap, x = 1.3, 0.1
    boxes = []
    for spec in specs:
        boxes.append((x, *spec))
        x += spec[0] + gap
    width = x - gap + 0.1
    fig, ax = plt.subplots(figsize=(width, 3.5))
    ax.set_xlim(0, width)
    ax.set_ylim(0, 3.5)
    ax.axis("off")
    y, h = 1.5, 1.0
    for x, w, title, what, nb, colour in boxes:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04,rounding_size=0.12", fc=colour,
                                    ec="#333333", lw=1.2))
        ax.text(x + w / 2, y + h * 0.66, title, ha="center", va="center", fontsize=10,
                weight="bold" if nb or title == "picture" else "normal")
        ax.text(x + w / 2, y + h * 0.25, what, ha="center", va="center", fontsize=7.5,
                color="#444444")
        if nb:      # above the loop's arrow for the UNet
            ax.text(x + w / 2, y + h + (0.6 if "UNet" in title else 0.12), f"notebook {nb}", ha="center", va="bottom", fontsize=7.5, color="#1f5fa8")

    def arrow(x0, y0, x1, y1, **kw):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=14, lw=1.4,
                                     color="#333333", **kw))

    labels = {1: shape("tokens"), 2: shape("text"), 3: shape("latents"), 4: shape("picture")}
    for k in range(len(boxes) - 1):
        x0 = boxes[k][0] + boxes[k][1] + 0.06
        x1 = boxes[k + 1][0] - 0.06
        arrow(x0, y + h / 2, x1, y + h / 2)
        if k in labels:
            top, bottom = labels[k]
            ax.text((x0 + x1) / 2, y + h / 2 + 0.12, top, ha="center", va="bottom", fontsize=7.5)
            ax.text((x0 + x1) / 2, y + h / 2 - 0.12, bottom, ha="center", va="top", fontsize=7, color="#666666")
    # the starting noise enters the loop from below, and the loop feeds itself
    ux, uw = boxes[3][0], boxes[3][1]
    arrow(ux + uw / 2, 0.35, ux + uw / 2, y - 0.06)
    ax.text(ux + uw / 2 + 0.1, 0.55, f"noise z_T {big['latents']}\ntiny: {small['latents']}", ha="left",
            va="center", fontsize=7.5)
    arrow(ux + uw - 0.25, y + h + 0.06, ux + 0.25, y + h + 0.06, connectionstyle="arc3,rad=0.6")
    ax.text(0.1, 0.2, "Shapes for one prompt and one image at the model's native size: SD v1.5 in black, the tiny model "
            "in grey. With guidance the UNet runs on a batch of 2 (unconditional + conditional).", fontsize=7.5,
            color="#444444", ha="left")
    fig.tight_layout()
    return fig


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
