"""One UNet call on the CPU: sdlearn against diffusers' UNet2DConditionModel, same weights, same process.

    flock /tmp/sdlearn-heavy.lock .venv/bin/python bench/unet_cpu.py        # SD v1.5, 64×64 latents, batch 2
    .venv/bin/python bench/unet_cpu.py --tiny                                # seconds
    flock /tmp/sdlearn-heavy.lock .venv/bin/python bench/unet_cpu.py --profile   # top ops of one call of each

The two UNets run alternately (after a warm-up call each, in which oneDNN builds its kernels),
with the order swapped every round, so that a noisy, shared machine slows both alike. The report
gives each one's median, the spread (min–max) and the ratio of the medians, plus the relative
difference of the outputs (they must agree within the parity tolerance, 1e-4).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import diffusers_unet_kwargs  # noqa: E402
from reference import randomize_, rel_err  # noqa: E402

import sdlearn.unet as unet_module  # noqa: E402
from sdlearn.configs import UNetConfig  # noqa: E402
from sdlearn.unet import UNet  # noqa: E402


def build(cfg: UNetConfig):
    """(ours, diffusers') with the same random weights; built on the meta device, so the slow
    default initialisation of 860 M parameters is skipped."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**diffusers_unet_kwargs(cfg))
    ours = randomize_(ours.to_empty(device="cpu")).eval()
    ref.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, strict=True, assign=True)
    return ours, ref.eval()


def plain(unet, *inputs):
    """sdlearn's UNet with only its channels-last layout: the oneDNN paths switched off."""
    unet_module._ONEDNN_OPS = False
    try:
        return unet(*inputs)
    finally:
        unet_module._ONEDNN_OPS = True


def profile(runs: dict, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for name, run in runs.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(f"\n=== {name} ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny config at 8×8 latents instead of SD v1.5 at 64×64")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="latent size (default 64 64, or 8 8 with --tiny)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="timed calls of each (default 5, or 20 with --tiny)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one call of each")
    parser.add_argument("--plain", action="store_true",
                        help="also time sdlearn with its oneDNN paths off (convolutions as matrix products, oneDNN linears)")
    args = parser.parse_args()

    cfg = UNetConfig.tiny() if args.tiny else UNetConfig.sd15()
    h, w = args.size or ((8, 8) if args.tiny else (64, 64))
    repeats = args.repeats or (20 if args.tiny else 5)
    t0 = time.perf_counter()
    ours, ref = build(cfg)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, cfg.in_channels, h, w, generator=g)
    context = torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([981] * args.batch)
    runs = {"sdlearn": lambda: ours(latents, t, context), "diffusers": lambda: ref(latents, t, context).sample}
    if args.plain:
        runs["sdlearn-plain"] = lambda: plain(ours, latents, t, context)
    print(f"UNet {'tiny' if args.tiny else 'SD v1.5'}, latents {args.batch}×{cfg.in_channels}×{h}×{w}, float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__} (built in {time.perf_counter() - t0:.0f} s)",
          flush=True)

    times = {name: [] for name in runs}
    with torch.inference_mode():
        outputs = {name: run() for name, run in runs.items()}      # warm-up
        if args.profile:
            profile(runs, rows=25)
            return
        for r in range(repeats):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}: " + ", ".join(f"{name} {ts[-1]:.3f} s" for name, ts in times.items()), flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"  {name:13s} median {med[name]:8.3f} s   spread {min(ts):.3f}–{max(ts):.3f}   "
              f"runs {', '.join(f'{x:.3f}' for x in ts)}")
    pair = [d / s for s, d in zip(times["sdlearn"], times["diffusers"])]
    print(f"  diffusers / sdlearn: {med['diffusers'] / med['sdlearn']:.3f} (ratio of medians), "
          f"per round median {statistics.median(pair):.3f}, range {min(pair):.3f}–{max(pair):.3f}")
    print(f"  sdlearn is {100 * (1 - med['sdlearn'] / med['diffusers']):.1f} % faster")
    for name in outputs:
        if name != "diffusers":
            print(f"  {name} output vs diffusers: relative difference {rel_err(outputs[name], outputs['diffusers']):.2e}")


if __name__ == "__main__":
    main()
