"""VAE decode on the CPU: sdlearn against diffusers' AutoencoderKL, same weights, same process.

    flock /tmp/sdlearn-heavy.lock .venv/bin/python bench/vae_cpu.py            # SD v1.5, 512×512
    .venv/bin/python bench/vae_cpu.py --tiny                                    # seconds

The two decoders run alternately (warm-up first) so that a noisy, shared machine slows both
alike; the report gives the median wall time of each and their ratio, the same for the process's
CPU time (less sensitive to other jobs on a shared machine), and the relative difference of the
outputs (they must agree to float32 rounding).

`--channels-last` runs sdlearn in NHWC memory format, for comparison: on this project's 2-core
CPU it was slower (GroupNorm and SiLU on NHWC tensors cost more than the convolutions gain);
the decode is dominated (about 85 %) by oneDNN convolutions, the same kernels in both.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import diffusers_vae_kwargs  # noqa: E402
from reference import randomize_, rel_err  # noqa: E402

from sdlearn.configs import VAEConfig  # noqa: E402
from sdlearn.vae import AutoencoderKL  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny config at 64×64 instead of SD v1.5 at 512×512")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512, or 64 with --tiny)")
    parser.add_argument("--repeats", type=int, help="timed decodes of each (default 2, or 10 with --tiny)")
    parser.add_argument("--channels-last", action="store_true", help="run sdlearn's decoder in channels_last memory format")
    args = parser.parse_args()

    from diffusers import AutoencoderKL as DiffusersVAE

    cfg = VAEConfig.tiny() if args.tiny else VAEConfig.sd15()
    size = args.size or (64 if args.tiny else 512)
    repeats = args.repeats or (10 if args.tiny else 2)
    torch.manual_seed(0)
    ref = randomize_(DiffusersVAE(**diffusers_vae_kwargs(cfg))).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    z = torch.randn(1, cfg.latent_channels, size // cfg.downsample_factor, size // cfg.downsample_factor)
    z_ours = z
    if args.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        z_ours = z.contiguous(memory_format=torch.channels_last)

    runs = {"sdlearn": lambda: ours.decode(z_ours), "diffusers": lambda: ref.decode(z).sample}
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    outputs = {}
    print(f"VAE decode {size}×{size}, {'tiny' if args.tiny else 'SD v1.5'}, float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
          f"{', channels_last' if args.channels_last else ''}", flush=True)
    with torch.inference_mode():
        for name, run in runs.items():          # warm-up: oneDNN builds its kernels on first use
            outputs[name] = run()
        for _ in range(repeats):
            for name, run in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                run()
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
    for label, table in (("wall", times), ("cpu", cpu_times)):
        med = {name: statistics.median(t) for name, t in table.items()}
        for name, t in table.items():
            print(f"  {label:4s} {name:10s} median {med[name]:8.3f} s   runs {', '.join(f'{x:.3f}' for x in t)}")
        print(f"  {label:4s} ratio sdlearn / diffusers: {med['sdlearn'] / med['diffusers']:.3f}")
    print(f"  output relative difference: {rel_err(outputs['sdlearn'], outputs['diffusers']):.2e}")


if __name__ == "__main__":
    main()
