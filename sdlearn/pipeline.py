"""The pipeline: the three networks, the tokenizer and the noise schedule, loaded together.

    pipe = sdlearn.load_pipeline("tiny")                        # the bundled model
    pipe = sdlearn.load_pipeline("v1-5-pruned-emaonly.safetensors")
    pipe = sdlearn.load_pipeline("path/to/diffusers-folder")
    pipe = sdlearn.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")   # via huggingface_hub
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .configs import ModelConfig
from .device import default_dtype, resolve_device
from .weights import COMPONENTS, CheckpointError, load_component, open_checkpoint

TINY_PATH = Path(__file__).resolve().parent / "data" / "tiny.safetensors"

# What to fetch from a Hugging Face repo in the diffusers layout (nothing else is downloaded).
HUB_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
             "tokenizer/*.json", "tokenizer/merges.txt"]
HUB_WEIGHTS = {"": ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"],
               "fp16": ["unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
                        "text_encoder/model.fp16.safetensors"]}


@dataclass(eq=False)
class Pipeline:
    """Everything needed to turn a prompt into an image."""
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    schedule: object
    device: torch.device
    dtype: torch.dtype
    config: ModelConfig
    source: str = ""

    def __repr__(self) -> str:
        params = {c: sum(p.numel() for p in getattr(self, c).parameters()) / 1e6 for c in COMPONENTS}
        sizes = ", ".join(f"{c} {n:.1f}M" for c, n in params.items())
        return f"Pipeline({self.source!r}, {self.device}, {str(self.dtype).replace('torch.', '')}; {sizes})"


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


def hub_snapshot(repo_id: str, fp16: bool = False) -> Path:
    """Download (or find in the cache) only the files sdlearn needs from a diffusers-layout repo."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: looks like a Hugging Face repo id, but huggingface_hub is not "
                              "installed; `pip install huggingface_hub`, or pass a local file or folder") from None
    patterns = HUB_FILES + HUB_WEIGHTS["fp16" if fp16 else ""]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass   # not (completely) in the cache
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                              "download it once with network access or pass a local path")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointError(f"{repo_id}: could not be fetched from the Hugging Face hub "
                              f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})") from None


def load_pipeline(source: str | os.PathLike = "tiny", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, *, config: ModelConfig | None = None) -> Pipeline:
    """Load the tokenizer, text encoder, UNet, VAE and schedule from one source.

    device=None picks cuda, then mps, then cpu; dtype=None picks float16 on cuda, float32
    elsewhere. Each tensor is cast and moved as it is read; on the CPU in its stored dtype a
    weight stays a view of the memory-mapped file, so the weights are never held twice.
    """
    from .schedule import NoiseSchedule
    from .tokenizer import CLIPTokenizer, default_tokenizer

    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected a floating torch.dtype such as torch.float32 or torch.float16")
    ckpt = open_checkpoint(resolve_source(source), config)
    models = {c: load_component(ckpt, c, device, dtype) for c in COMPONENTS}
    tokenizer = CLIPTokenizer.from_folder(ckpt.tokenizer_folder) if ckpt.tokenizer_folder else default_tokenizer()
    return Pipeline(tokenizer=tokenizer, schedule=NoiseSchedule.scaled_linear(), device=device, dtype=dtype,
                    config=ckpt.config, source=str(source), **models)
