"""The CPU benchmark (`make bench`): sdlearn against diffusers (and OpenVINO), same weights.

    flock /tmp/sdlearn-heavy.lock .venv/bin/python bench/run_cpu.py            # SD v1.5 size (≈ 30 min on 2 cores)
    flock /tmp/sdlearn-heavy.lock .venv/bin/python bench/run_cpu.py --quick    # fewer repeats (≈ 12 min)
    .venv/bin/python bench/run_cpu.py --tiny --quick                           # tiny sizes, seconds
    .venv/bin/python bench/run_cpu.py --only unet,vae                          # some rows only

Rows (SD v1.5 size with random weights; `--tiny`: the tiny config at its own sizes):
    unet    one UNet call, latents 2×4×64×64 (one guided step at 512×512)
    vae     one VAE decode to 512×512
    text    the text encoder on 2 × 77 tokens (negative + prompt)
    image   one whole 512×512 image: 20 DDIM steps, guidance 7.5 (generate vs StableDiffusionPipeline)
    load    load time and peak RSS, one fresh process per run (bench/load_memory.py's measurement)
    tiny    the bundled tiny model: one 64×64 image, its default 20 DDIM steps, guidance 7.5
    bf16    the unet, vae and image rows again with both pipelines in bfloat16
    openvino  the UNet call and VAE decode on OpenVINO (diffusers' converted), float32 and bfloat16,
            against sdlearn in the same dtype; skipped, saying why, without `openvino`

At the top: the CPU's model and vector/matrix extensions (sdlearn.cpu_features) and its measured
matrix-product peak in float32 and bfloat16 (bench/cpu_peers.py); UNet rows give the achieved
TFLOP/s (sdlearn.unet.flops_per_call) beside the peak of their dtype.

Both libraries run the very same weight tensors: sdlearn loads a random original-layout file
(made once by bench/load_memory.py under .cache/bench), and diffusers' models are built on the
meta device and handed sdlearn's tensors (bench/common.py). Every row times the two alternately
(bench/common.py: warm-up, order reversed every other round) and shows medians, spreads and
sdlearn / diffusers ratios; the last column checks that the outputs agree.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, Table, alternate, diffusers_twin, machine, on_torch_threads, rel_err  # noqa: E402

import cpu_peers  # noqa: E402
import load_memory  # noqa: E402
import sdlearn  # noqa: E402
from sdlearn.unet import flops_per_call  # noqa: E402

PARTS = ["unet", "vae", "text", "image", "load", "tiny", "bf16", "openvino"]
PROMPT, NEGATIVE = "a red circle on the left", "a blue square"
# repeats per row: full, --quick
REPEATS = {"unet": (7, 3), "vae": (5, 2), "text": (10, 5), "image": (3, 1), "load": (2, 1), "tiny": (10, 3),
           "bf16": (5, 2), "openvino": (5, 2)}


def image_runs(ours, ref, size: int, steps: int, seed: int = 0):
    """generate / StableDiffusionPipeline from the same unit noise, on the same threads; both return
    pixels in [0, 1]."""
    f = ours.latent_factor
    noise = torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(seed))
    return {
        "sdlearn": on_torch_threads(lambda: ours.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, sampler="ddim",
                                                          guidance=7.5, latents=noise, height=size, width=size,
                                                          progress=False).pixels),
        "diffusers": lambda: ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                                 latents=noise.to(ref.unet.dtype), height=size, width=size, output_type="pt").images,
    }


def timed_pair(runs: dict, repeats: int, label: str) -> tuple[dict[str, list[float]], dict]:
    """Outputs of one call each (compared by the caller), then the alternating timings."""
    with torch.inference_mode():
        outputs = {name: run() for name, run in runs.items()}
        times = alternate(runs, repeats, label)
    return times, outputs


def unet_row(ours, ref, latents, t, context, repeats: int, flops: float, peak: float, label: str = "") -> Row:
    """One UNet call of each, alternately; the note: agreement and achieved TFLOP/s."""
    dtype = ours.dtype
    latents, context = latents.to(dtype), context.to(dtype)
    times, out = timed_pair({"sdlearn": lambda: ours.unet(latents, t, context),
                             "diffusers": lambda: ref.unet(latents, t, context).sample}, repeats, "unet" + label)
    side = latents.shape[-1]
    return Row(f"UNet call{label}, latents 2×4×{side}×{side}", times["sdlearn"], times["diffusers"],
               note=f"rel. diff {rel_err(out['sdlearn'], out['diffusers']):.1e}; "
                    + cpu_peers.achieved(flops, times["sdlearn"], times["diffusers"], peak))


def bf16_table(path, size_name: str, repeats: int, steps: int, peak: float) -> Table:
    """The UNet, VAE and whole-image rows with both pipelines in bfloat16. The check column compares
    the two bfloat16 computations with each other (they round at different places: about 1e-2)."""
    table = Table(f"CPU, bfloat16 (both libraries), {size_name}, same random weights")
    ours = sdlearn.load_pipeline(path, "cpu", torch.bfloat16)
    ref = diffusers_twin(ours)
    cfg, side = ours.config, ours.config.unet.sample_size
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, cfg.unet.in_channels, side, side, generator=g)
    context = ours.text_encoder(ours.tokenizer([NEGATIVE, PROMPT])).detach()
    z = torch.randn(1, cfg.vae.latent_channels, side, side, generator=g).bfloat16()
    table.add(unet_row(ours, ref, latents, torch.tensor([981, 981]), context, repeats, flops_per_call(cfg.unet), peak,
                       " (bf16)"))
    times, out = timed_pair({"sdlearn": lambda: ours.vae.decode(z), "diffusers": lambda: ref.vae.decode(z).sample},
                            repeats, "vae bf16")
    pixels = side * ours.latent_factor
    table.add(Row(f"VAE decode (bf16) to {pixels}×{pixels}", times["sdlearn"], times["diffusers"],
                  note=f"rel. diff {rel_err(out['sdlearn'], out['diffusers']):.1e}"))
    times, out = timed_pair(image_runs(ours, ref, pixels, steps), max(1, repeats // 2), "image bf16")
    diff = (out["sdlearn"] - out["diffusers"].float()).abs().max().item()
    table.add(Row(f"whole {pixels}×{pixels} image (bf16), {steps} DDIM steps, guided", times["sdlearn"],
                  times["diffusers"], note=f"max Δpixel {diff:.1e}"))
    return table


def openvino_table(ours, ref, latents, t, context, z, repeats: int, peaks: dict, flops: float,
                   size_name: str) -> Table:
    """sdlearn's UNet call and VAE decode against OpenVINO's compilations of diffusers' (same
    tensors), float32 and bfloat16; the ratio is sdlearn / OpenVINO."""
    table = Table(f"CPU: sdlearn against OpenVINO, {size_name}", ref_name="OpenVINO")
    for precision, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        name = str(dtype).removeprefix("torch.")
        run = cpu_peers.openvino_unet(ref.unet, (latents, t, context), precision)
        if isinstance(run, str):
            print(f"openvino rows skipped: {run}", file=sys.stderr, flush=True)
            table.title += f" (skipped: {run})"
            return table
        unet = ours.unet if dtype == torch.float32 else copy.deepcopy(ours.unet).to(dtype)
        x, c = latents.to(dtype), context.to(dtype)
        times, out = timed_pair({"sdlearn": lambda: unet(x, t, c), "OpenVINO": lambda: run(latents, t, context)},
                                repeats, f"openvino unet {precision}")
        table.add(Row(f"UNet call, {name}", times["sdlearn"], times["OpenVINO"],
                      note=f"rel. diff {rel_err(out['sdlearn'].float(), out['OpenVINO']):.1e}; "
                           + cpu_peers.achieved(flops, times["sdlearn"], times["OpenVINO"], peaks[dtype], "OpenVINO")))
        unet = run = None              # free the copy and the compiled UNet before the VAE
        decode = cpu_peers.openvino_decoder(ref.vae, z, precision)
        if isinstance(decode, str):
            table.title += f" (VAE skipped: {decode})"
            continue
        vae = ours.vae if dtype == torch.float32 else copy.deepcopy(ours.vae).to(dtype)
        zz = z.to(dtype)
        times, out = timed_pair({"sdlearn": lambda: vae.decode(zz), "OpenVINO": lambda: decode(z)},
                                repeats, f"openvino vae {precision}")
        side = z.shape[-1] * ours.latent_factor
        table.add(Row(f"VAE decode to {side}×{side}, {name}", times["sdlearn"], times["OpenVINO"],
                      note=f"rel. diff {rel_err(out['sdlearn'].float(), out['OpenVINO']):.1e}"))
    return table


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny config at its own sizes instead of SD v1.5 (seconds)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated rows, from {', '.join(PARTS)}")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps of the whole-image rows")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; expected some of {', '.join(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = {part: REPEATS[part][1 if args.quick else 0] for part in PARTS}
    size_name = "tiny config" if args.tiny else "SD v1.5 size"
    table = Table(f"CPU, float32, {size_name}, random weights; {machine()}")
    started = time.perf_counter()
    n = 1024 if args.tiny else 4096
    peaks = {dt: cpu_peers.matmul_peak(dt, n) for dt in (torch.float32, torch.bfloat16)}
    head = cpu_peers.header(peaks, n)
    print(head, file=sys.stderr, flush=True)
    tables = [table]

    path, folder = load_memory.make_file(args.tiny)
    if "load" in parts:       # first, while this process holds no models (the children are measured alone)
        print("load: child processes", file=sys.stderr, flush=True)
        res = load_memory.measure(path, folder, reps["load"])
        get = lambda lib, key: [r[key] for r in res[lib]]
        table.add(Row("load the single file (fresh process)", get("sdlearn", "load_s"), get("diffusers", "load_s")))
        table.add(Row("peak RSS: load + one pass of each model", get("sdlearn", "peak_mb"), get("diffusers", "peak_mb"),
                      unit="MB", fmt="{:.0f}", note="VmHWM of the child"))

    if {"unet", "vae", "text", "image", "openvino"} & set(parts):
        ours = sdlearn.load_pipeline(path, "cpu", torch.float32)
        ref = diffusers_twin(ours)
        cfg = ours.config
        side = cfg.unet.sample_size                     # latent side: 64 for SD v1.5, 8 for tiny
        pixels = side * ours.latent_factor
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(2, cfg.unet.in_channels, side, side, generator=g)
        ids = ours.tokenizer([NEGATIVE, PROMPT])
        context = ours.text_encoder(ids).detach()
        t = torch.tensor([981, 981])
        z = torch.randn(1, cfg.vae.latent_channels, side, side, generator=g)
        flops = flops_per_call(cfg.unet)
        if "unet" in parts:
            table.add(unet_row(ours, ref, latents, t, context, reps["unet"], flops, peaks[torch.float32]))
        if "vae" in parts:
            times, out = timed_pair({"sdlearn": lambda: ours.vae.decode(z),
                                     "diffusers": lambda: ref.vae.decode(z).sample}, reps["vae"], "vae")
            table.add(Row(f"VAE decode to {pixels}×{pixels}", times["sdlearn"], times["diffusers"],
                          note=f"rel. diff {rel_err(out['sdlearn'], out['diffusers']):.1e}"))
        if "text" in parts:
            times, out = timed_pair({"sdlearn": lambda: ours.text_encoder(ids),
                                     "diffusers": lambda: ref.text_encoder(ids).last_hidden_state}, reps["text"], "text")
            table.add(Row("text encoder, 2 × 77 tokens", times["sdlearn"], times["diffusers"],
                          note=f"rel. diff {rel_err(out['sdlearn'], out['diffusers']):.1e}"))
        if "image" in parts:
            times, out = timed_pair(image_runs(ours, ref, pixels, args.steps), reps["image"], "image")
            diff = (out["sdlearn"] - out["diffusers"].float()).abs().max().item()
            table.add(Row(f"whole {pixels}×{pixels} image, {args.steps} DDIM steps, guided", times["sdlearn"],
                          times["diffusers"], note=f"max Δpixel {diff:.1e}"))
        if "openvino" in parts:
            tables.append(openvino_table(ours, ref, latents, t, context, z, reps["openvino"], peaks, flops, size_name))
        del ours, ref

    if "bf16" in parts:
        tables.append(bf16_table(path, size_name, reps["bf16"], args.steps, peaks[torch.bfloat16]))

    if "tiny" in parts:
        ours = sdlearn.load_pipeline("tiny", "cpu", torch.float32)
        ref = diffusers_twin(ours)
        times, out = timed_pair(image_runs(ours, ref, 64, args.steps), reps["tiny"], "tiny")
        diff = (out["sdlearn"] - out["diffusers"].float()).abs().max().item()
        table.add(Row(f"tiny model: one 64×64 image, {args.steps} DDIM steps", times["sdlearn"], times["diffusers"],
                      note=f"max Δpixel {diff:.1e}"))

    shown = [t.render() if t.rows else t.title for t in tables if t.rows or "skipped" in t.title]
    text = "\n\n".join([head] + shown) + f"\n(took {time.perf_counter() - started:.0f} s)"
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
