"""Where the model runs, in which precision, and on how many CPU threads.

    device:  $SDLEARN_DEVICE if set, else cuda, else mps (Apple), else cpu
    dtype:   float16 on cuda (half the memory, tensor cores), float32 elsewhere;
             dtype="auto" (`auto_dtype`) also picks bfloat16 on CPUs that multiply it natively
    threads: $SDLEARN_THREADS if set, else the count the user chose, else one thread for a model
             too small to gain from more (`choose_threads`), else torch's default (all cores)

CPUs have no fast float16 matrix kernels and MPS float16 is still patchy, so both stay in float32
by default: float32 is what gives diffusers' numbers to rounding, which the notebooks teach.
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager

import numpy as np
import torch

from . import cpu_features

ENV_DEVICE = "SDLEARN_DEVICE"
ENV_THREADS = "SDLEARN_THREADS"


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


# The CPUs' bfloat16 product units that dtype="auto" takes bfloat16 for (cpu_features.bf16_products).
#   amx_bf16     Intel Sapphire Rapids and later: a 4096² product 2.5 TFLOP/s against 0.42 in float32,
#                an SD v1.5 UNet call 1.96 s against 5.7 (diffusers, 2-core Xeon; issue 18).
#   avx512_bf16  the project's 2-core AMD EPYC (Zen 5), one thread, load average 2–3: a 4096² product
#                0.31–0.35 TFLOP/s against 0.09; sdlearn's SD v1.5 UNet call 8.5–9.0 s against 12.1 s
#                (1.4×), the VAE decode to 512×512 12.4 s against 20.2 s (1.6×); OpenVINO's UNet
#                5.7 s against 10.4 s. Pixels move by 1.5/255 on average (README: CPU).
# CPUs without either convert bfloat16 to float32 for every product and gain nothing.
AUTO_BF16_UNITS = ("amx_bf16", "avx512_bf16")


def auto_dtype(device: str | torch.device | None = None,
               cpu: cpu_features.CPUFeatures | None = None) -> torch.dtype:
    """dtype="auto": the fastest dtype that keeps the pictures, chosen from what the hardware reports.

        cuda                                              float16 (as default_dtype)
        a CPU that multiplies bfloat16 natively (AMX-BF16
          or AVX512_BF16: AUTO_BF16_UNITS), with
          PyTorch's oneDNN bfloat16 kernels                bfloat16 (8-bit mantissa: pixels move by
                                                          a few levels of 255; README: CPU)
        any other CPU, mps                                float32
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.float16
    if dev.type == "cpu":
        cpu = cpu or cpu_features.detect()
        bf16_kernels = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        if cpu.bf16_products in AUTO_BF16_UNITS and torch.backends.mkldnn.is_available() and bf16_kernels():
            return torch.bfloat16
    return torch.float32


def cpu_generator(seed: int) -> torch.Generator:
    """The generator sdlearn draws starting noise from: a CPU one, as diffusers' pipelines use, so
    a seed gives the same noise (and picture) on every device."""
    return torch.Generator("cpu").manual_seed(seed)


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


# torch's thread count when sdlearn was imported: its default (physical cores, or $OMP_NUM_THREADS),
# unless the user set another before importing sdlearn. A different count later means they chose it.
TORCH_THREADS = torch.get_num_threads()

# The work per UNet call (FLOPs of one guided call, batch 2, at the model's native size:
# unet.flops_per_call) from which `generate` keeps all of torch's threads; below it, one thread.
# Two threads gain on a quiet CPU at every size, but they meet at a barrier after every operation,
# and when another process holds one thread's core the other waits for it, operation after
# operation. The rule (issue 14): a count is fit when one busy process beside it keeps the time
# within 3× of the quiet time. Medians on the project's 2-core AMD EPYC, torch 2.13:
#
#     work per call               2 threads: quiet → 1 busy process      1 thread: quiet → busy
#     tiny model, 0.44 GFLOP      169 ms → 514 ms (3.0×; 8.3× beside     202 ms → 200 ms (1.0×;
#       (a whole 64×64 image)       two, single images up to 11 s)         1.7× beside two)
#     SD UNet at 8×8, 27 GFLOP    190 ms → 2.7 s (14×)                   320 ms → 339 ms
#     SD v1.5, 1,607 GFLOP        4.9 s → 13.9 s (2.8×)                  8.7 s → 8.7 s
#
# One thread barely notices a busy neighbour (the other core is free) and costs the tiny model
# 1.2× when the machine is quiet; at SD v1.5's size two threads are 1.8× faster quiet and stay
# within the bound. bench/under_load.py measures the tiny model's row.
PARALLEL_FLOPS = 1e12


def choose_threads(flops_per_call: float | None) -> int:
    """How many CPU threads to run a model that does `flops_per_call` per UNet call on
    (None: not on the CPU). In order:

        $SDLEARN_THREADS      if set (a positive integer): the user's word for sdlearn
        the current count     if the user chose it: $OMP_NUM_THREADS or $MKL_NUM_THREADS set, or
                              torch.set_num_threads called since sdlearn was imported
        1                     below PARALLEL_FLOPS: small operations, whose threads meet at a
                              barrier after every one, and stall whenever another process takes
                              one thread's core
        torch's default       otherwise: large operations gain from every core
    """
    requested = os.environ.get(ENV_THREADS, "").strip()
    if requested:
        if not requested.isdigit() or int(requested) < 1:
            raise ValueError(f"${ENV_THREADS}={requested!r}: expected a positive number of CPU threads such as 1 "
                             "or 2; unset it to let sdlearn choose")
        return int(requested)
    current = torch.get_num_threads()
    chosen = current != TORCH_THREADS or any(os.environ.get(v, "").strip() for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    if chosen or flops_per_call is None:
        return current
    return 1 if flops_per_call < PARALLEL_FLOPS else current


@contextmanager
def using_threads(n: int):
    """torch.set_num_threads(n) inside the block, and the count found before it afterwards
    (torch's count is process-wide: the caller's own work must not stay on sdlearn's choice).

    Switching costs nothing measurable: setting 1 then 2 threads takes 0.2 µs, and a tiny-model
    image switched 2 → 1 → 2 around it took 197.9 ms against 197.4 ms held at 1 thread (medians
    of 15 on the 2-core EPYC, the caller's 2-thread work in between)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way.

    A CPU generator is what makes sdlearn's starting noise equal to diffusers' for the same seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return cpu_generator(seed)


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
