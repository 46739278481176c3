"""Where a pipeline comes from, and what its checkpoint says about how to run it.

    resolve_source("tiny")                      → the bundled file
    resolve_source("~/models/v1-5.safetensors") → that file (or a diffusers folder)
    resolve_source("owner/name")                → a Hugging Face snapshot (cache first)
    read_defaults(ckpt)                         → the noise schedule, default sampler and steps
    read_vocabulary(metadata)                   → the words a closed-grammar model knows (the tiny one)
    read_preview(metadata)                      → the latent preview stored with the checkpoint, if any

Defaults come from the checkpoint: a diffusers folder's `scheduler/scheduler_config.json` (its
scheduler class names the sampler, its beta schedule the noise schedule), or the `sdlearn_defaults`
metadata sdlearn writes into its own files; else SD v1.5's (PNDM, 50 steps, scaled_linear betas
0.00085 … 0.012), as diffusers runs the SD v1.5 repository.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint
from .preview import LatentPreview
from .request import MAX_STEPS
from .safetensors_file import CheckpointError
from .samplers import SAMPLERS
from .schedule import NoiseSchedule

TINY_PATH = Path(__file__).resolve().parent / "data" / "tiny.safetensors"

# What to fetch from a Hugging Face repo in the diffusers layout (nothing else is downloaded).
HUB_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
             "scheduler/scheduler_config.json", "tokenizer/*.json", "tokenizer/merges.txt",
             "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"]

# Diffusers' defaults for the SD v1.5 repo: its scheduler is a PNDMScheduler, and
# StableDiffusionPipeline runs num_inference_steps=50 at guidance_scale=7.5.
SD15_DEFAULTS = {"sampler": "pndm", "steps": 50}

# diffusers scheduler class → sdlearn sampler (each matches that class built from the SD v1.5 config)
SCHEDULER_CLASSES = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                     "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                     "DPMSolverMultistepScheduler": "dpmpp_2m"}
# diffusers beta_schedule → sdlearn NoiseSchedule
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}


@dataclass
class Defaults:
    """How a checkpoint wants to be run when `generate` is not told otherwise."""
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule.scaled_linear)
    generate: dict = field(default_factory=dict)     # {"sampler", "steps", "steps_offset"}, whichever it says


def resolve_source(source: str | os.PathLike) -> Path:
    """"tiny" → the bundled file; an existing path → itself; "owner/name" → a Hugging Face
    snapshot (cache first, honouring HF_HUB_OFFLINE)."""
    if str(source) == "tiny":
        if not TINY_PATH.exists():
            raise CheckpointError(f"the tiny model ({TINY_PATH.name}) is not in this installation of sdlearn; "
                                  "train and export it (see README, 'The tiny model') or set SDLEARN_WEIGHTS")
        return TINY_PATH
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and Path(text).suffix == ""
    if not looks_like_repo:
        raise CheckpointError(f"{source}: no such file or folder; expected \"tiny\", an SD v1.x .safetensors file, "
                              "a diffusers folder or a Hugging Face repo id such as owner/name")
    return hub_snapshot(text)


def hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the cache) only the files sdlearn needs from a diffusers-layout repo."""
    try:
        from huggingface_hub import snapshot_download    # optional: only for repo ids
    except ImportError:
        raise CheckpointError(f"{repo_id}: looks like a Hugging Face repo id, but huggingface_hub is not "
                              "installed; `pip install huggingface_hub`, or pass a local file or folder") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        pass   # not (completely) in the cache
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                              "download it once with network access or pass a local path")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:
        raise CheckpointError(f"{repo_id}: could not be fetched from the Hugging Face hub "
                              f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})") from None


def read_defaults(ckpt: Checkpoint) -> Defaults:
    """The schedule and generation defaults of an opened checkpoint: from a diffusers folder's
    scheduler config, else from sdlearn's `sdlearn_defaults` metadata, else SD v1.5's."""
    name = Path(ckpt.source).name
    if ckpt.scheduler_config is not None:
        return scheduler_defaults(ckpt.scheduler_config, f"{name}/scheduler/scheduler_config.json")
    return Defaults(generate=metadata_defaults(ckpt.metadata, name))


def scheduler_defaults(config: dict, where: str) -> Defaults:
    """A diffusers `scheduler_config.json` → the noise schedule and the default sampler.

    The beta schedule must be one sdlearn implements (scaled_linear, linear, squaredcos_cap_v2)
    and the model must predict ε; anything else is refused, since sampling with the wrong
    schedule draws noise. An unknown scheduler class only loses the default sampler (a warning)."""
    kind = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas") is not None or kind not in BETA_SCHEDULES:
        raise CheckpointError(f"{where}: beta_schedule {kind!r}{' with trained_betas' if config.get('trained_betas') else ''} "
                              f"is not implemented; sdlearn has {', '.join(BETA_SCHEDULES)}")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{where}: prediction_type {config['prediction_type']!r} (an SD 2.x-style "
                              "v-prediction model); sdlearn's samplers take ε-prediction models only")
    try:
        T = int(config.get("num_train_timesteps", 1000))
        if BETA_SCHEDULES[kind] == "cosine":
            schedule = NoiseSchedule.cosine(T)
        else:
            schedule = getattr(NoiseSchedule, BETA_SCHEDULES[kind])(
                T, float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: its schedule cannot be built ({exc})") from None
    generate = {}
    cls = config.get("_class_name")
    if cls in SCHEDULER_CLASSES:
        generate["sampler"] = SCHEDULER_CLASSES[cls]
    else:
        warnings.warn(f"{where}: scheduler class {cls!r} has no sdlearn sampler; the default sampler is "
                      f"{SD15_DEFAULTS['sampler']} (choose one with generate(sampler=...): {', '.join(SAMPLERS)})",
                      stacklevel=3)
    if isinstance(config.get("steps_offset"), int) and config["steps_offset"] >= 0:
        generate["steps_offset"] = config["steps_offset"]
    clips = config.get("clip_sample", cls in ("DDIMScheduler", "DDPMScheduler"))   # diffusers' class defaults
    if clips or config.get("thresholding"):
        warnings.warn(f"{where}: clip_sample / thresholding is on; sdlearn's samplers never clip x̂₀ (SD v1.5's "
                      "scheduler does not either), so pictures will differ from diffusers'", stacklevel=3)
    spacing = config.get("timestep_spacing", "leading")
    if spacing != "leading":
        warnings.warn(f"{where}: timestep_spacing {spacing!r}; sdlearn's samplers space timesteps as SD v1.5 "
                      "does ('leading'), so pictures will differ slightly from diffusers'", stacklevel=3)
    return Defaults(schedule, generate)


def metadata_defaults(metadata: dict[str, str], name: str = "checkpoint") -> dict:
    """The generation defaults a checkpoint carries in its `sdlearn_defaults` metadata
    (JSON such as {"sampler": "ddim", "steps": 20}); {} when it has none."""
    raw = metadata.get("sdlearn_defaults")
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{name}: its sdlearn_defaults metadata is not JSON ({exc})") from None
    out = {}
    if isinstance(d, dict) and d.get("sampler") in SAMPLERS:
        out["sampler"] = d["sampler"]
    if isinstance(d, dict) and isinstance(d.get("steps"), int) and 1 <= d["steps"] <= MAX_STEPS:
        out["steps"] = d["steps"]
    if not isinstance(d, dict) or len(out) != len({k: v for k, v in d.items() if k in ("sampler", "steps")}):
        warnings.warn(f"{name}: sdlearn_defaults {raw[:80]!r} has unusable entries; using SD v1.5's "
                      f"defaults for them", stacklevel=3)
    return out


def read_vocabulary(metadata: dict[str, str], name: str = "checkpoint") -> dict | None:
    """The words and grammar a model was trained on, from its `sdlearn_vocabulary` metadata
    (JSON {"words": [...], "grammar": [...]}), for models that know nothing else (the tiny one);
    None for a general model."""
    raw = metadata.get("sdlearn_vocabulary")
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        if not (isinstance(d.get("words"), list) and isinstance(d.get("grammar"), list)
                and all(isinstance(w, str) for w in d["words"] + d["grammar"]) and d["grammar"]):
            raise ValueError("expected lists of strings under 'words' and 'grammar'")
    except (json.JSONDecodeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{name}: its sdlearn_vocabulary metadata is invalid ({exc})") from None
    return d


def read_preview(metadata: dict[str, str], name: str = "checkpoint") -> LatentPreview | None:
    """The latent preview a checkpoint stores (`sdlearn_preview`: LatentPreview.state_dict() as
    JSON, fitted when the tiny model was exported); None when it stores none."""
    raw = metadata.get("sdlearn_preview")
    if raw is None:
        return None
    try:
        return LatentPreview.from_state_dict(json.loads(raw))
    except (json.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{name}: its sdlearn_preview metadata is invalid ({exc})") from None
