"""Where the model runs and in which precision.

    device: $SDLEARN_DEVICE if set, else cuda, else mps (Apple), else cpu
    dtype:  float16 on cuda (half the memory, tensor cores), float32 elsewhere

CPUs have no fast float16 matrix kernels and MPS float16 is still patchy, so both stay in float32.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

ENV_DEVICE = "SDLEARN_DEVICE"


def default_device() -> torch.device:
    """cuda > mps > cpu, overridable with the environment variable SDLEARN_DEVICE."""
    requested = os.environ.get(ENV_DEVICE, "").strip()
    if requested:
        return resolve_device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn None / "cuda" / "cuda:1" / torch.device into a usable torch.device, or explain why not."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a device name; expected 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for (argument or ${ENV_DEVICE}) but this PyTorch build "
            "sees no CUDA GPU; use device='cpu' or unset the variable"
        )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} was asked for but MPS is not available here; use 'cpu'")
    return dev


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """float16 on CUDA, float32 everywhere else."""
    dev = resolve_device(device)
    return torch.float16 if dev.type == "cuda" else torch.float32


def randn(shape, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """N(0, I) noise of `shape`, drawn on the generator's device and then moved to `device`, as
    diffusers' `randn_tensor` draws it: a CPU generator gives the same numbers whatever device the
    model runs on (a seed means the same picture on a laptop and on a GPU)."""
    device = torch.device(device)
    draw_on = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"a {generator.device.type} generator cannot make noise for a tensor on "
                             f"{device}; use a CPU generator or one on {device}")
        draw_on = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


def random_seed() -> int:
    """A seed for a run that was given none (drawn from torch's global generator)."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way.

    A CPU generator is what makes sdlearn's starting noise equal to diffusers' for the same seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator("cpu").manual_seed(seed)


def describe() -> dict:
    """A small report for notebooks and `sdlearn info`: versions, device, dtype, threads."""
    dev = default_device()
    info = {
        "torch": torch.__version__,
        "device": str(dev),
        "dtype": str(default_dtype(dev)).replace("torch.", ""),
        "cpu_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info
