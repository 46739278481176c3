"""sdlearn — Stable Diffusion v1.5 built from scratch in PyTorch, one idea per module.

    import sdlearn
    pipe = sdlearn.load_pipeline(sdlearn.default_source())
    pipe.generate("a red circle on the left").images[0]
"""
from __future__ import annotations

import os

from .device import default_device, default_dtype, seed_everything

__version__ = "0.1.0"
__all__ = ["load_pipeline", "Pipeline", "default_source", "default_device", "default_dtype", "seed_everything"]

ENV_WEIGHTS = "SDLEARN_WEIGHTS"


def default_source() -> str:
    """$SDLEARN_WEIGHTS when it is set (a checkpoint file, a diffusers folder or a Hugging Face
    repo id), else "tiny", the small model that ships inside the package."""
    return os.environ.get(ENV_WEIGHTS, "").strip() or "tiny"


def __getattr__(name: str):
    # Imported lazily so that `import sdlearn` stays fast and light.
    if name in ("load_pipeline", "Pipeline"):
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdlearn' has no attribute {name!r}")
