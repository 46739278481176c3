"""Training on several processes: N processes compute what one process computes.

    torchrun --standalone --nproc_per_node 2 -m sdlearn.train unet --out runs/tiny      # one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id tiny --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 -m sdlearn.train unet --out /shared/runs/tiny   # on each machine

nccl on GPUs (--device cuda, one GPU per process), gloo on CPUs. On several machines the run
folder must be one they all see: rank 0 writes the checkpoints there, and every process reads
them on --resume and, in stage 2, stage 1's latents.pt.

The batch of step k (which pictures, ε, t, caption dropout) is drawn for the *global* batch of B
rows from a CPU generator seeded with (seed, k), identically in every process; process r of N
keeps rows r·B/N … (r+1)·B/N − 1. DistributedDataParallel then averages the gradients,

    (1/N) Σ_r ∇L_r = ∇L,   L_r the mean loss over process r's B/N rows, L the mean over all B rows,

so every process takes the same optimizer step, and that step is the one a single process would
take on the whole batch (up to float rounding: the sums run in a different order).
tests/test_train_ddp.py checks both, after every step of both stages. The same generator makes
`--resume` exact: step k draws the same numbers whether or not the run stopped before it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from .device import resolve_device

T = TypeVar("T")


@dataclass
class Dist:
    """Where this process runs: rank r of `world` processes, on `device`."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        """The mean of a number over all processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def part(self, batch: int) -> slice:
        """This process's rows of a global batch: rank·B/N … (rank+1)·B/N − 1."""
        if batch % self.world:
            raise ValueError(f"--batch {batch} is not divisible by the {self.world} processes")
        local = batch // self.world
        return slice(self.rank * local, (self.rank + 1) * local)

    def main_first(self, make: Callable[[], T]) -> T:
        """make() on the main process, then on the others (so that they read what it cached)."""
        if self.main:
            result = make()
        self.barrier()
        if not self.main:
            result = make()
        return result


def init_distributed(device: str | None = None) -> Dist:
    """One process (default), or one of WORLD_SIZE processes started by torchrun: then the
    process group is initialised with nccl on GPUs, gloo on CPUs, one GPU per local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:
        return Dist(0, 1, dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator for training step `step`: same numbers in every process and on resume."""
    return torch.Generator().manual_seed((seed % 2**31) * 2**32 + step)
