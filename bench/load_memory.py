"""Load time and peak host memory: sdlearn vs diffusers on a full-size SD v1.5 single file.

    python bench/load_memory.py            # SD v1.5 size (a 4.3 GB random file is made once)
    python bench/load_memory.py --tiny     # the same at tiny size, in seconds

Each measurement runs in a fresh child process, alternating sdlearn and diffusers, so peak RSS
(VmHWM) belongs to one library alone. A run = load the single file + one forward pass of
each component (text encoder on 77 tokens, UNet on one 64×64 latent, VAE decode of one 32×32
latent). Random weights (no hub access here) in the original CompVis layout, float32, CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"


def rss_mb(field: str = "VmHWM") -> float:
    """A memory figure of this process from /proc/self/status, in MiB: by default the peak resident
    memory so far (VmHWM; not ru_maxrss: on Linux a child inherits its parent's ru_maxrss across
    fork + exec); "RssAnon" and "RssFile" split the current resident memory into private
    memory and pages of mapped files."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else float("nan")


def make_file(tiny: bool) -> tuple[Path, Path]:
    """A random original-layout file and a diffusers config folder (configs only) for it."""
    import torch

    from sdlearn.checkpoint import COMPONENTS, MODEL_CLASSES
    from sdlearn.configs import ModelConfig
    from sdlearn.layouts import save_original_checkpoint

    sys.path.insert(0, str(REPO / "tests"))
    from checkpoints import diffusers_unet_kwargs, diffusers_vae_kwargs, transformers_clip_kwargs, write_tokenizer_files

    cfg = ModelConfig.tiny() if tiny else ModelConfig.sd15()
    name = "tiny" if tiny else "sd15"
    path = CACHE / f"{name}-random.safetensors"
    folder = CACHE / f"{name}-diffusers-config"
    CACHE.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        torch.manual_seed(0)
        models = {}
        for comp in COMPONENTS:
            m = MODEL_CLASSES[comp](getattr(cfg, comp))
            with torch.no_grad():
                for p in m.parameters():
                    p.normal_(0, 0.02)
            models[comp] = m
        # No sdlearn metadata for SD v1.5: like a real file, it is recognised by its shapes.
        save_original_checkpoint(path, models, cfg, store_config=tiny)
        del models
    if not (folder / "model_index.json").exists():
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        unet = {"_class_name": "UNet2DConditionModel", **diffusers_unet_kwargs(cfg.unet)}
        vae = {"_class_name": "AutoencoderKL", **diffusers_vae_kwargs(cfg.vae)}
        text = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                **transformers_clip_kwargs(cfg.text_encoder)}
        sched = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1}
        for sub, c in (("unet", unet), ("vae", vae), ("text_encoder", text)):
            (folder / sub / "config.json").write_text(json.dumps(c, default=list))
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
        write_tokenizer_files(folder / "tokenizer")
        (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}))
    return path, folder


def child(lib: str, path: str, folder: str) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_grad_enabled(False)
    base = rss_mb()
    t0 = time.perf_counter()
    if lib == "sdlearn":
        import sdlearn
        pipe = sdlearn.load_pipeline(path, device="cpu", dtype=torch.float32)
        unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
        encode = lambda ids: text(ids)
        predict = lambda z, t, c: unet(z, t, c)
        decode = lambda z: vae.decode(z)
        c_dim, size = pipe.config.unet.cross_attention_dim, pipe.config.unet.sample_size
    else:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False,
                                                        torch_dtype=torch.float32)
        encode = lambda ids: pipe.text_encoder(ids).last_hidden_state
        predict = lambda z, t, c: pipe.unet(z, t, c).sample
        decode = lambda z: pipe.vae.decode(z).sample
        c_dim, size = pipe.unet.config.cross_attention_dim, pipe.unet.config.sample_size
    load_s = time.perf_counter() - t0
    load_rss = rss_mb()
    ids = torch.full((1, 77), 49407)
    ids[0, :4] = torch.tensor([49406, 320, 1929, 49407])
    t1 = time.perf_counter()
    ctx = encode(ids)
    assert ctx.shape[-1] == c_dim
    predict(torch.randn(1, 4, size, size), 500, ctx)
    decode(torch.randn(1, 4, max(size // 2, 8), max(size // 2, 8)))
    forward_s = time.perf_counter() - t1
    return {"lib": lib, "load_s": load_s, "forward_s": forward_s, "base_mb": base,
            "peak_after_load_mb": load_rss, "peak_mb": rss_mb(),
            "anon_mb": rss_mb("RssAnon"), "file_mb": rss_mb("RssFile")}


def measure(path: Path, folder: Path, repeats: int) -> dict[str, list[dict]]:
    """`repeats` child runs of each library, alternating (sdlearn first, then the order reversed
    every other round); each child's dict as `child` returns it."""
    results: dict[str, list[dict]] = {"sdlearn": [], "diffusers": []}
    with open(path, "rb") as f:         # into the page cache first: neither library pays a cold disk read
        while f.read(1 << 26):
            pass
    for r in range(repeats):
        for lib in (list(results) if r % 2 == 0 else list(reversed(results))):
            out = subprocess.run([sys.executable, __file__, "--child", lib, str(path), str(folder)],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                raise SystemExit(f"{lib} run failed:\n{out.stderr[-3000:]}")
            results[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (quick)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("LIB", "PATH", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    path, folder = make_file(args.tiny)
    print(f"file: {path.name} ({path.stat().st_size / 1e9:.2f} GB), float32, CPU, "
          f"{os.cpu_count()} cores; alternating, {args.repeats} runs each, fresh process per run")
    results = measure(path, folder, args.repeats)
    rows = [("load time (s)", "load_s", "{:.2f}"), ("forward passes (s)", "forward_s", "{:.2f}"),
            ("peak RSS after load (MB)", "peak_after_load_mb", "{:.0f}"), ("peak RSS overall (MB)", "peak_mb", "{:.0f}"),
            ("  at the end: private (MB)", "anon_mb", "{:.0f}"), ("  at the end: mapped files (MB)", "file_mb", "{:.0f}")]
    print(f"\n{'':<26}{'sdlearn':>16}{'diffusers':>16}{'ratio':>8}")
    for label, key, fmt in rows:
        a = [r[key] for r in results["sdlearn"]]
        b = [r[key] for r in results["diffusers"]]
        ma, mb = statistics.median(a), statistics.median(b)
        spread = lambda xs: f"±{(max(xs) - min(xs)) / 2:.2g}" if len(xs) > 1 else ""
        print(f"{label:<26}{fmt.format(ma):>10}{spread(a):>6}{fmt.format(mb):>10}{spread(b):>6}{ma / mb:>8.2f}")
    weights_mb = path.stat().st_size / 2**20
    print(f"\nweights in the file: {weights_mb:.0f} MiB. RSS counts the file's pages that a"
          " model has used (mapped: shared, clean page cache, not a copy); sdlearn's NaN/inf check at"
          " load reads the file with ordinary reads, so loading itself maps none.")


if __name__ == "__main__":
    main()
