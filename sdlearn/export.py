"""A trained model leaves its run folder: as a Pipeline in memory (what stage 2 evaluates while it
trains) and as one safetensors file (what `sdlearn.load_pipeline` reads).

    pipe = training_pipeline(text_encoder, unet, vae, config)      # models in memory → Pipeline
    evaluate_alignment(pipe, guidance=(5.0, 1.0))                   # {"5.0": {"colour": 0.97, …}, …}
    export("runs/tiny", "sdlearn/data/tiny.safetensors")            # the EMA weights, one file

Both generate with EXPORT_DEFAULTS (DDIM, 20 steps): the model is evaluated with the settings
its users get, since the file stores them in its metadata and the pipeline reads them from there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import analyser, shapes
from .configs import ModelConfig
from .layouts import save_original_checkpoint
from .pipeline import Pipeline
from .preview import LatentPreview, fitting_images
from .schedule import NoiseSchedule
from .tokenizer import default_tokenizer
from .viz import image_grid

MAX_EXPORT_BYTES = 25_000_000
EXPORT_DEFAULTS = {"sampler": "ddim", "steps": 20}   # what the tiny model is evaluated (and used) with


def training_pipeline(text_encoder: nn.Module, unet: nn.Module, vae: nn.Module, config: ModelConfig,
                      device: torch.device | str = "cpu") -> Pipeline:
    """A Pipeline around models in memory (the tokenizer is the bundled one), generating with
    the defaults the export writes: DDIM, 20 steps."""
    return Pipeline(tokenizer=default_tokenizer(), text_encoder=text_encoder.eval(), unet=unet.eval(), vae=vae.eval(),
                    schedule=NoiseSchedule.scaled_linear(), device=torch.device(device), dtype=torch.float32,
                    config=config, source="training run", defaults=dict(EXPORT_DEFAULTS))


def evaluate_alignment(pipe: Pipeline, *, guidance: tuple[float, ...] = (5.0, 1.0), steps: int = 20, seed: int = 0,
                       grid: str | Path | None = None, pairs: bool = True) -> dict[str, dict[str, float]]:
    """The 108 one-object grammar prompts and (with `pairs`) the 120 two-object prompts at each
    guidance scale, scored with the analyser: {guidance: {"colour", "shape", "position", "found",
    "stray", "circle", "pair_both", "pair_colour", …}} (the pair scores of `analyser.score_pairs`,
    prefixed "pair_"). With `grid`, the first scale's one-object images are saved there as a
    picture with their prompts."""
    result = {}
    for i, g in enumerate(guidance):
        scores, pixels = analyser.alignment(pipe, guidance=g, steps=steps, seed=seed)
        if pairs:
            pair_scores, _ = analyser.pair_alignment(pipe, guidance=g, steps=steps, seed=seed)
            scores.update({f"pair_{k}": v for k, v in pair_scores.items()})
        result[str(g)] = scores
        if grid is not None and i == 0:
            import matplotlib.pyplot as plt   # only when drawing, as in viz.py: pyplot picks a GUI backend on import

            fig = image_grid(list(pixels), [p["prompt"] for p in shapes.grammar_prompts()], ncols=12, size=1.1,
                             fontsize=5)
            fig.savefig(grid, dpi=80)
            plt.close(fig)
    return result


@torch.no_grad()
def fit_preview(vae: nn.Module, pictures: int = 64, seed: int = 0) -> LatentPreview:
    """The latent preview stored with the model: fitted on the generic pictures of
    `preview.fitting_images` and on `pictures` of the dataset the model was trained on."""
    data = shapes.make_dataset(pictures, seed)
    images = torch.cat([fitting_images(), data.images.float() / 127.5 - 1])
    return LatentPreview.fit(vae, images)


def export(run: str | Path, path: str | Path, *, dtype: torch.dtype | None = None,
           max_bytes: int = MAX_EXPORT_BYTES, overwrite: bool = False,
           defaults: dict[str, Any] | None = None) -> Path:
    """The run's EMA weights → one safetensors file in the original CompVis single-file layout
    (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`)
    with, in its metadata, the ModelConfig ("sdlearn_config"), the generation defaults the
    pipeline reads ("sdlearn_defaults", default DDIM with 20 steps, as evaluated here), how it
    was trained ("sdlearn_training"), the words it knows ("sdlearn_vocabulary", so that generate
    can warn about others) and its latent preview ("sdlearn_preview"). dtype None: float32 if the file stays within `max_bytes`,
    else float16."""
    from .train import TextToNoise, load_checkpoint, load_ema_vae   # import cycle: train.py evaluates with this module

    run, path = Path(run), Path(path)
    config = ModelConfig.from_dict(json.loads((run / "config.json").read_text()))
    unet_ckpt = load_checkpoint(run / "unet.pt")
    config = ModelConfig.from_dict({**unet_ckpt["config"], "vae": config.vae.to_dict()})
    pair = TextToNoise(config)
    pair.load_state_dict(unet_ckpt["ema"])
    models = {"text_encoder": pair.text_encoder, "unet": pair.unet, "vae": load_ema_vae(run, config, torch.device("cpu"))}
    if dtype is None:
        n = sum(p.numel() for m in models.values() for p in m.parameters())
        dtype = torch.float32 if 4 * n <= max_bytes else torch.float16
    if overwrite and path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    vae_step = load_checkpoint(run / "vae.pt")["step"]
    training = {"vae_steps": vae_step, "unet_steps": unet_ckpt["step"], "settings": unet_ckpt["settings"]}
    if len(unet_ckpt.get("parts", [])) > 1:     # resumed with other settings: each part's, from its first step
        training["unet_parts"] = unet_ckpt["parts"]
    defaults = EXPORT_DEFAULTS if defaults is None else defaults
    vocabulary = {"words": shapes.vocabulary(), "grammar": list(shapes.GRAMMAR)}
    save_original_checkpoint(path, models, config, dtype=dtype, extra_metadata={
        "sdlearn_training": json.dumps(training), "sdlearn_defaults": json.dumps(defaults),
        "sdlearn_vocabulary": json.dumps(vocabulary), "sdlearn_preview": json.dumps(fit_preview(models["vae"]).state_dict())})
    path.chmod(0o644)          # readable by all, like the package's other data files
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit; "
                         "shrink the text encoder's width (its 49408-row token embedding dominates)")
    return path
