"""Text encoder speed: sdlearn's CLIPTextModel against transformers', same weights, same input.

    .venv/bin/python bench/clip_speed.py [--size sd15|tiny] [--batch 2] [--rounds 10]

Batch 2 × 77 tokens (a guided prompt: unconditional + conditional), float32, CPU, inference
mode. The two models are timed alternately in this process (the machine is shared and noisy);
medians, and sdlearn's time as a fraction of transformers' (ratio of the medians, and the
median of the per-round ratios, which cancels slow drifts in load). Their outputs are compared too.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdlearn.clip import CLIPTextModel
from sdlearn.configs import CLIPTextConfig
from sdlearn.tokenizer import default_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    import transformers
    cfg = getattr(CLIPTextConfig, args.size)()
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_dict(), hidden_act="quick_gelu")).eval()
    ours = CLIPTextModel(cfg).eval()
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    ids = default_tokenizer()(["", "a photograph of an astronaut riding a horse"] * (args.batch // 2 + 1))[:args.batch]

    calls = {"sdlearn": lambda: ours(ids), "transformers": lambda: ref(input_ids=ids).last_hidden_state}
    times = {name: [] for name in calls}
    with torch.inference_mode():
        out = {name: fn() for name, fn in calls.items()}          # warm-up
        err = ((out["sdlearn"] - out["transformers"]).norm() / out["transformers"].norm()).item()
        for _ in range(args.rounds):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"CLIP text encoder, {args.size}, batch {args.batch} × 77, float32, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__} "
          f"(attention: {ref.config._attn_implementation})")
    for name, m in med.items():
        print(f"  {name:>12}: median {m * 1000:7.1f} ms  (min {min(times[name]) * 1000:.1f}, max {max(times[name]) * 1000:.1f})")
    paired = statistics.median(a / b for a, b in zip(times["sdlearn"], times["transformers"]))
    print(f"  sdlearn / transformers time: ratio of medians {med['sdlearn'] / med['transformers']:.3f}, "
          f"median of per-round ratios {paired:.3f}; "
          f"relative difference of outputs {err:.1e}")


if __name__ == "__main__":
    main()
