"""The GPU benchmark: guided steps per second, seconds per image and peak memory, sdlearn against
diffusers, eager and compiled.

    .venv/bin/python bench/gpu.py                    # on a CUDA GPU: float16, SD v1.5, 512×512, 50 steps
    .venv/bin/python bench/gpu.py --no-compile       # eager only (compiling takes minutes)
    .venv/bin/python bench/gpu.py --tiny             # anywhere, in seconds (no GPU: the CPU, float32)

Variants (all holding the same random weight tensors, timed alternately round by round):
    sdlearn                      eager
    sdlearn compiled             `pipe.compile()`  (torch.compile, mode "default")
    sdlearn CUDA graphs          `pipe.compile("reduce-overhead")`  (GPU only)
    diffusers                    eager StableDiffusionPipeline, SDPA attention
    diffusers compiled           `unet.compile()`, `vae.decoder.compile()` as diffusers' docs suggest
Figures: guided steps per second (one UNet call on batch 2, i.e. negative + prompt, the latents
of one image), seconds per whole image (text encoding, `--steps` DDIM steps, VAE decode), peak
device memory during an image (CUDA only), and each as a ratio to diffusers eager. The last
column is the largest pixel difference from diffusers eager's image, from the same noise.

Without a CUDA device the script says so and runs on the CPU at float32 (float16 convolutions on
a CPU are slow and not what anyone would run); with `--tiny` that is the test of this script.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, diffusers_twin, machine, on_torch_threads, spread  # noqa: E402

from sdlearn.configs import ModelConfig  # noqa: E402
from sdlearn.pipeline import Pipeline  # noqa: E402

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"


@torch.no_grad()
def random_pipeline(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Pipeline:
    """An sdlearn pipeline with random weights made on the device (no file: a GPU machine need not
    write 4 GB first). Matrices and kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.2²), biases
    N(0, 0.2²), as tests/reference.randomize_ does, so activations stay O(1) in float16."""
    from sdlearn.schedule import NoiseSchedule
    from sdlearn.tokenizer import default_tokenizer
    from sdlearn.checkpoint import COMPONENTS, build_empty

    gen = torch.Generator(device).manual_seed(seed)
    models = {}
    for comp in COMPONENTS:
        module = build_empty(comp, config).to_empty(device=device)
        for name, p in module.named_parameters():
            p.normal_(generator=gen)
            if p.ndim >= 2:
                p.mul_(p[0].numel() ** -0.5)
            else:
                p.mul_(0.2).add_(1.0 if name.endswith("weight") else 0.0)
        models[comp] = module.to(dtype).eval()
    return Pipeline(tokenizer=default_tokenizer(), schedule=NoiseSchedule.scaled_linear(), device=device, dtype=dtype,
                    config=config, source="random", **models)


def sibling(pipe: Pipeline) -> Pipeline:
    """A second pipeline with new module objects holding the same tensors, to compile separately."""
    from dataclasses import replace

    from sdlearn.checkpoint import build_empty
    parts = {}
    for comp in ("unet", "vae", "text_encoder"):
        module = build_empty(comp, pipe.config)
        module.load_state_dict(getattr(pipe, comp).state_dict(), strict=True, assign=True)
        parts[comp] = module.eval()
    return replace(pipe, **parts)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny config at 64×64 (seconds; what the tests run)")
    ap.add_argument("--steps", type=int, help="DDIM steps per image (default 50; 5 with --tiny)")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 10 for steps, 3 for images; 3 and 2 with --tiny)")
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    config = ModelConfig.tiny() if args.tiny else ModelConfig.sd15()
    steps = args.steps or (5 if args.tiny else 50)
    step_repeats = args.repeats or (3 if args.tiny else 10)
    image_repeats = args.repeats or (2 if args.tiny else 3)
    if not cuda:
        print(f"no CUDA device: running on the CPU in float32 ({'tiny sizes' if args.tiny else 'slow!'}); "
              "these are not GPU figures", file=sys.stderr, flush=True)

    ours = random_pipeline(config, device, dtype)
    ref = diffusers_twin(ours)
    variants: dict[str, tuple] = {"sdlearn": (ours, "sdlearn"), "diffusers": (ref, "diffusers")}
    if not args.no_compile:
        variants["sdlearn compiled"] = (sibling(ours).compile(), "sdlearn")
        if cuda:
            variants["sdlearn CUDA graphs"] = (sibling(ours).compile("reduce-overhead"), "sdlearn")
        ref_compiled = diffusers_twin(ours)              # new diffusers modules, the same tensors
        ref_compiled.unet.compile()
        ref_compiled.vae.decoder.compile()
        variants["diffusers compiled"] = (ref_compiled, "diffusers")

    side = config.unet.sample_size
    pixels = side * ours.latent_factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    noise = torch.randn(1, 4, side, side, generator=g).to(device, dtype)
    context = ours.encode_prompts([PROMPT], [NEGATIVE])
    t = torch.tensor(981, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(pipe, lib):
        if lib == "sdlearn":
            return lambda: pipe.unet(latents, t, context)
        return lambda: pipe.unet(latents, t, context).sample

    def image(pipe, lib):
        if lib == "sdlearn":
            return on_torch_threads(lambda: pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler="ddim",
                                                          latents=noise, progress=False).pixels)
        return lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, latents=noise,
                            height=pixels, width=pixels, output_type="pt").images.float().cpu()

    started = time.perf_counter()
    peak, pictures = {}, {}
    with torch.inference_mode():
        for name, (pipe, lib) in variants.items():        # first calls: compiling happens here
            t0 = time.perf_counter()
            for _ in range(3):                              # CUDA graphs record on a later call
                step(pipe, lib)()
            pictures[name] = image(pipe, lib)()            # compiles the VAE decoder, if it is to be
            if cuda:
                sync()
                torch.cuda.reset_peak_memory_stats()
                image(pipe, lib)()
                sync()
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
            print(f"  {name}: ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        step_times = alternate({n: step(p, lib) for n, (p, lib) in variants.items()}, step_repeats, "step", sync)
        image_times = alternate({n: image(p, lib) for n, (p, lib) in variants.items()}, image_repeats, "image", sync)

    base_step = statistics.median(step_times["diffusers"])
    base_image = statistics.median(image_times["diffusers"])
    what = "float16" if cuda else "float32 (CPU: no CUDA device)"
    lines = [f"{'GPU' if cuda else 'CPU'}, {what}, {'tiny config' if args.tiny else 'SD v1.5 size'}, random weights, "
             f"{pixels}×{pixels}, batch 2 guided, {steps} DDIM steps per image; "
             f"{torch.cuda.get_device_name(device) if cuda else 'CPU'}; {machine()}",
             "ratios against diffusers eager (steps/s: above 1 is faster; s/image and memory: below 1 is better)",
             "| variant | steps/s | spread | ratio | s/image | spread | ratio | peak memory | ratio | max Δpixel |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in variants:
        rates = [1 / x for x in step_times[name]]
        mem = f"{peak[name]:.0f} MiB | {peak[name] / peak['diffusers']:.2f}" if cuda else "– | –"
        diff = (pictures[name] - pictures["diffusers"]).abs().max().item()
        lines.append(f"| {name} | {statistics.median(rates):.2f} | {spread(rates, '{:.2f}')} | "
                     f"{base_step / statistics.median(step_times[name]):.2f} | "
                     f"{statistics.median(image_times[name]):.3f} | {spread(image_times[name], '{:.3f}')} | "
                     f"{statistics.median(image_times[name]) / base_image:.2f} | {mem} | {diff:.1e} |")
    lines.append(f"(took {time.perf_counter() - started:.0f} s, compiling included)")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
