"""What the benchmarks share: timing two contenders alternately, the summary table, and a diffusers
pipeline that holds the very tensors of an sdlearn pipeline.

Timing rules (the machine is shared and noisy): a warm-up call of each contender first (oneDNN
builds its kernels, caches fill), then `repeats` rounds, each timing every contender once, the
order reversed every other round so that neither always runs right after the other. Reported:
medians, the spread (min–max), the ratio of the medians, and the median (and range) of the
per-round ratios, which cancels slow drifts in the machine's load.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sdlearn.device import ENV_THREADS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))      # the reference-model helpers live with the tests


def alternate(runs: dict[str, Callable[[], object]], repeats: int, label: str = "",
              sync: Callable[[], None] = lambda: None, log: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each run, `repeats` each, alternating. Warm-up calls are not timed."""
    for run in runs.values():
        run()
    sync()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            t0 = time.perf_counter()
            runs[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
        if log:
            print(f"  {label} round {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()),
                  file=sys.stderr, flush=True)
    return times


@contextmanager
def environment(name: str, value: str | None):
    """os.environ[name] = value (None: unset) inside the block, as it was afterwards."""
    before = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if before is not None:
            os.environ[name] = before


def on_torch_threads(run: Callable[[], object]) -> Callable[[], object]:
    """`run` with sdlearn's `generate` on torch's current thread count, as the reference runs
    ($SDLEARN_THREADS set to it): left to itself, sdlearn puts a tiny model on one thread."""
    def pinned():
        with environment(ENV_THREADS, str(torch.get_num_threads())):
            return run()
    return pinned


def spread(xs: list[float], fmt: str) -> str:
    return f"{fmt.format(min(xs))}–{fmt.format(max(xs))}" if len(xs) > 1 else "–"


@dataclass
class Row:
    """One line of the table: sdlearn's values against the reference's (same length, paired by round)."""
    what: str
    ours: list[float]
    ref: list[float]
    unit: str = "s"
    fmt: str = "{:.3f}"
    note: str = ""

    @property
    def ratio(self) -> float:
        return statistics.median(self.ours) / statistics.median(self.ref)

    def cells(self) -> list[str]:
        paired = [a / b for a, b in zip(self.ours, self.ref)]
        per_round = (f"{statistics.median(paired):.2f} ({min(paired):.2f}–{max(paired):.2f})"
                     if len(paired) > 1 else "–")
        ours, ref, unit, fmt = self.ours, self.ref, self.unit, self.fmt
        if unit == "s" and max(ours + ref) < 1:                  # short calls read better in ms
            ours, ref, unit, fmt = [1000 * x for x in ours], [1000 * x for x in ref], "ms", "{:.1f}"
        return [self.what, f"{fmt.format(statistics.median(ours))} {unit}", spread(ours, fmt),
                f"{fmt.format(statistics.median(ref))} {unit}", spread(ref, fmt),
                f"{self.ratio:.2f}", per_round, str(len(self.ours)), self.note]


@dataclass
class Table:
    title: str
    ref_name: str = "diffusers"
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def render(self) -> str:
        head = ["", "sdlearn", "spread", self.ref_name, "spread", "ratio", "per-round ratio", "n", "check"]
        body = [head] + [r.cells() for r in self.rows]
        widths = [max(len(line[i]) for line in body) for i in range(len(head))]
        lines = [self.title, "ratio = sdlearn / " + self.ref_name + " (medians; below 1: sdlearn is faster or smaller)"]
        for j, line in enumerate(body):
            lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
            if j == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def machine() -> str:
    """A one-line description of where the figures come from."""
    import diffusers
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{datetime.date.today().isoformat()}, {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# -- a diffusers twin of an sdlearn pipeline ----------------------------------------------------

def diffusers_twin(pipe, sampler: str = "ddim"):
    """diffusers' StableDiffusionPipeline holding the same weight tensors as `pipe` (no copy):
    each reference model is built on the meta device and loaded with `assign=True` from sdlearn's
    state dict (the names are diffusers' and transformers'). Scheduler: the SD v1.5 one of that kind."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from checkpoints import (diffusers_unet_kwargs, diffusers_vae_kwargs, transformers_clip_kwargs,
                             write_tokenizer_files)
    from test_samplers import reference_scheduler

    cfg = pipe.config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(cfg.unet))
        vae = AutoencoderKL(**diffusers_vae_kwargs(cfg.vae))
        text = CLIPTextModel(CLIPTextConfig(**transformers_clip_kwargs(cfg.text_encoder)))
    unet.load_state_dict(pipe.unet.state_dict(), strict=True, assign=True)
    vae.load_state_dict(pipe.vae.state_dict(), strict=True, assign=True)
    # transformers 5 names CLIP's tensors without the `text_model.` prefix (4.x and checkpoints have it)
    prefix = "" if "embeddings.token_embedding.weight" in text.state_dict() else "text_model."
    text.load_state_dict({prefix + k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()},
                         strict=True, assign=True)
    # position_ids is a non-persistent buffer: in no state dict, so still on the meta device.
    text.get_submodule(prefix + "embeddings").position_ids = torch.arange(cfg.text_encoder.max_position_embeddings)[None]
    left = [n for m in (unet, vae, text) for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    assert not left, f"tensors left on the meta device: {left}"
    folder = REPO / ".cache" / "bench" / "tokenizer"
    write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    twin = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=reference_scheduler(sampler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    twin.set_progress_bar_config(disable=True)
    return twin          # already on pipe's device and dtype: the tensors are pipe's own
