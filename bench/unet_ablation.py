"""What each of the UNet's CPU speed paths is worth: one UNet call with them switched on one at a
time, against diffusers' UNet, in the same process, alternately.

    flock /tmp/sdlearn-heavy.lock .venv/bin/python bench/unet_ablation.py     # SD v1.5, 64×64 latents, batch 2
    .venv/bin/python bench/unet_ablation.py --tiny                             # seconds
    .venv/bin/python bench/unet_ablation.py --profile     # torch.profiler's top ops: sdlearn, then diffusers

Variants (each adds one `sdlearn.fast_cpu` path to the one above, through its switch
`fast_cpu.enable(unet, paths)`; see that module's table):
    plain layers, NCHW        the same PyTorch operations as diffusers, SDPA attention
    + channels-last           feature maps kept channels-last ("channels_last")
    + oneDNN linear           linear layers through oneDNN instead of the BLAS library ("linear")
    + small convs as matmul   3×3 convs on small maps and all 1×1 convs as one oneDNN matrix product ("conv")
    + fused GEGLU             GEGLU as two oneDNN products with the GELU fused in ("geglu"): sdlearn as shipped
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, alternate, machine, rel_err, spread  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from checkpoints import diffusers_unet_kwargs  # noqa: E402
from reference import randomize_  # noqa: E402

from sdlearn import fast_cpu  # noqa: E402
from sdlearn.configs import UNetConfig  # noqa: E402
from sdlearn.unet import UNet  # noqa: E402


def build(cfg: UNetConfig):
    """(sdlearn's UNet, diffusers') with the same random weights (every parameter randomised);
    built on the meta device, so the slow default initialisation of 860 M parameters is skipped."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**diffusers_unet_kwargs(cfg))
    ours = randomize_(ours.to_empty(device="cpu")).eval()
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)    # the same tensors, no copy
    return ours, ref.eval()


def profile(runs: dict, rows: int = 25) -> str:
    """torch.profiler's table of the ops that took the most time in one call of each run."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    tables = []
    for name, run in runs.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        tables.append(f"=== {name} ===\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n\n".join(tables)


@contextlib.contextmanager
def switches(unet, level: int):
    """level 0: nothing; 1: + channels-last; 2: + oneDNN linear; 3: + matmul convs; 4: + fused GEGLU."""
    fast_cpu.enable(unet, fast_cpu.PATHS[:level])
    try:
        yield
    finally:
        fast_cpu.disable(unet)


NAMES = ["plain layers, NCHW", "+ channels-last", "+ oneDNN linear", "+ small convs as matmul",
         "+ fused GEGLU (as shipped)"]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny config (seconds)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: the top ops of one call of sdlearn (as shipped) and of diffusers")
    args = ap.parse_args(argv)
    cfg = UNetConfig.tiny() if args.tiny else UNetConfig.sd15()
    ours, ref = build(cfg)
    side = cfg.sample_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, side, side, generator=g)
    t = torch.tensor([981, 981])
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)

    def variant(level: int):
        def run():
            with switches(ours, level):
                return ours(x, t, ctx)
        return run

    runs = {name: variant(level) for level, name in enumerate(NAMES)}
    runs["diffusers"] = lambda: ref(x, t, ctx).sample
    with torch.inference_mode():
        if args.profile:
            for run in runs.values():              # warm-up: oneDNN builds its kernels on the first call
                run()
            text = profile({"sdlearn": runs[NAMES[-1]], "diffusers": runs["diffusers"]})
            print(text, flush=True)
            return text
        want = runs["diffusers"]()
        errors = {name: rel_err(run(), want) for name, run in runs.items()}
        times = alternate(runs, args.repeats, "ablation")
    base = statistics.median(times["diffusers"])
    lines = [f"UNet call, {'tiny' if args.tiny else 'SD v1.5'} size, latents 2×{cfg.in_channels}×{side}×{side}, "
             f"float32, CPU; {machine()}",
             "| variant | median | spread | / diffusers | rel. diff vs diffusers |", "|---|---|---|---|---|"]
    for name in runs:
        med = statistics.median(times[name])
        lines.append(f"| {name} | {med:.4f} s | {spread(times[name], '{:.4f}')} | {med / base:.2f} | {errors[name]:.1e} |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
