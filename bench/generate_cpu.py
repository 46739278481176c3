"""Whole generations on the CPU: `Pipeline.generate` against diffusers' StableDiffusionPipeline.

    .venv/bin/python bench/generate_cpu.py                     # tiny config, 64×64, 20 DDIM steps
    .venv/bin/python bench/generate_cpu.py --threads 1 --steps 50 --sampler pndm

Both pipelines hold the same random weights (diffusers' own conversion of the same original-
layout file) and start from the same seed; they run alternately after a warm-up, so that a
noisy shared machine slows both alike. Reported: median wall and CPU time per image, their
ratio, and the largest pixel difference between the two (it must stay below 2e-3).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import diffusers_from_original, original_file  # noqa: E402
from test_samplers import reference_scheduler  # noqa: E402

from sdlearn.configs import ModelConfig  # noqa: E402
from sdlearn.pipeline import load_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig.tiny()
    ours = load_pipeline(original_file(cfg), "cpu", torch.float32)
    ref = diffusers_from_original(cfg)
    ref.tokenizer.model_max_length = 77
    ref.scheduler = reference_scheduler(args.sampler)
    ref.set_progress_bar_config(disable=True)
    prompt, negative = "a red circle on the left", "a blue square"

    runs = {
        "sdlearn": lambda: ours.generate(prompt, negative_prompt=negative, steps=args.steps, sampler=args.sampler,
                                         guidance=args.guidance, seed=0, progress=False).pixels,
        "diffusers": lambda: ref(prompt, negative_prompt=negative, num_inference_steps=args.steps,
                                 guidance_scale=args.guidance, generator=torch.Generator().manual_seed(0),
                                 output_type="pt").images,
    }
    print(f"generate 64×64, tiny config, {args.sampler} {args.steps} steps, guidance {args.guidance}, float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    outputs = {name: run() for name, run in runs.items()}            # warm-up
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for label, table in (("wall", wall), ("cpu", cpu)):
        med = {name: statistics.median(t) for name, t in table.items()}
        for name, t in table.items():
            print(f"  {label:4s} {name:10s} median {med[name]:7.3f} s/image   runs {', '.join(f'{x:.3f}' for x in t)}")
        print(f"  {label:4s} ratio sdlearn / diffusers: {med['sdlearn'] / med['diffusers']:.3f}")
    diff = (outputs["sdlearn"] - outputs["diffusers"].float()).abs().max().item()
    print(f"  max |pixel difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
