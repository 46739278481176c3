"""The `sdlearn` command (also `python -m sdlearn`).

    sdlearn info CHECKPOINT      what a checkpoint holds: per component tensors, parameters,
                                 dtypes, bytes, and the layout sdlearn detected
    sdlearn generate PROMPT      text → PNG files (img2img with --image, inpainting with --mask),
                                 the prompt and settings stored in each PNG's text chunks
    sdlearn train …              train the tiny model (see sdlearn/train.py)

`generate` never overwrites a file unless --force, checks every output name before loading the
model, and writes each PNG through a temporary file renamed into place, so an interrupted run
leaves no half-written picture.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import sdlearn
from .checkpoint import open_checkpoint, summarize
from .device import random_seed
from .images import open_image, save_png
from .pipeline import load_pipeline
from .safetensors_file import CheckpointError
from .sources import read_vocabulary, resolve_source


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def info(source: str) -> str:
    """The report `sdlearn info` prints, as text. Reads headers only."""
    ckpt = open_checkpoint(resolve_source(source))
    layout = {"original": "original CompVis single file", "diffusers": "diffusers folder"}[ckpt.layout]
    lines = [f"checkpoint: {ckpt.source}", f"layout:     {layout}", "",
             f"{'component':<14}{'tensors':>8}{'params (M)':>12}  {'dtypes':<10}{'size':>10}"]
    total = 0
    for comp, s in summarize(ckpt).items():
        total += s["bytes"]
        lines.append(f"{comp:<14}{s['tensors']:>8}{s['parameters'] / 1e6:>12.1f}  {','.join(s['dtypes']):<10}"
                     f"{_size(s['bytes']):>10}")
    if ckpt.other:
        lines.append(f"{'(other)':<14}{len(ckpt.other):>8}  not loaded: {', '.join(sorted(ckpt.other)[:3])}"
                     f"{' …' if len(ckpt.other) > 3 else ''}")
    lines.append(f"{'total':<14}{'':>8}{'':>12}  {'':<10}{_size(total):>10}")
    vocabulary = read_vocabulary(ckpt.metadata, Path(ckpt.source).name)
    if vocabulary is not None:
        side = ckpt.config.unet.sample_size * ckpt.config.vae.downsample_factor
        lines += ["", f"This model knows only the grammar it was trained on, at {side}×{side} pixels:"]
        lines += [f"  {g}" for g in vocabulary["grammar"]]
        lines.append(f"  words: {', '.join(vocabulary['words'])}")
        lines.append("Other words and sizes give colourful nonsense (generate warns).")
    return "\n".join(lines)


# -- generate -------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    """"512x768" → (width 512, height 768)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x512; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def output_paths(out: str | None, seed: int, n: int) -> list[Path]:
    """Where the n pictures go. No -o: sdlearn-SEED.png (sdlearn-SEED-I.png for several) here;
    -o FOLDER/ (or an existing folder): those names inside it; -o NAME.png: that file
    (NAME-I.png for several)."""
    names = [f"sdlearn-{seed}.png"] if n == 1 else [f"sdlearn-{seed}-{i}.png" for i in range(n)]
    if out is None:
        return [Path(name) for name in names]
    path = Path(out).expanduser()
    if path.is_dir() or out.endswith(("/", os.sep)):
        return [path / name for name in names]
    if path.suffix.lower() != ".png":
        raise ValueError(f"-o {out}: expected a .png file name or a folder (ending in /)")
    if not path.parent.is_dir():
        raise ValueError(f"-o {out}: folder {path.parent} does not exist; create it first")
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}.png") for i in range(n)]


def png_text(settings: dict, index: int, n: int, args) -> dict[str, str]:
    """The PNG text chunks: everything needed to make the picture again."""
    text = {"prompt": args.prompt, "negative_prompt": args.negative or "", "sampler": settings["sampler"],
            "steps": settings["steps"], "guidance": settings["guidance"], "seed": settings["seed"],
            "size": f"{settings['width']}x{settings['height']}", "weights": settings["source"],
            "Software": f"sdlearn {sdlearn.__version__}"}
    if n > 1:
        text["batch_index"] = f"{index} of {n} (same seed, -n {n})"
    if args.image:
        text.update(image=Path(args.image).name, strength=settings["strength"])
    if args.mask:
        text["mask"] = Path(args.mask).name
    if settings.get("prompt_syntax"):
        text["prompt_syntax"] = settings["prompt_syntax"]
    return {k: str(v) for k, v in text.items()}


def generate(args) -> list[Path]:
    """Run `sdlearn generate` from parsed arguments; returns the files written."""
    if args.mask and not args.image:
        raise ValueError("--mask needs --image: inpainting repaints the mask's white part of that picture")
    if args.strength is not None and not args.image:
        raise ValueError("--strength applies to image-to-image; pass --image FILE too")
    seed = args.seed if args.seed is not None else random_seed()
    paths = output_paths(args.output, seed, args.n)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                              "choose another -o or pass --force to overwrite")
    image = open_image(args.image, "--image") if args.image else None
    mask = open_image(args.mask, "--mask") if args.mask else None
    width, height = args.size if args.size else (None, None)
    pipe = load_pipeline(args.weights or sdlearn.default_source(), device=args.device)
    kwargs = dict(image=image, mask=mask) if image is not None else {}
    if args.strength is not None:
        kwargs["strength"] = args.strength
    result = pipe.generate(args.prompt, negative_prompt=args.negative, num_images=args.n, steps=args.steps,
                           guidance=args.guidance, sampler=args.sampler, seed=seed, height=height, width=width,
                           steps_offset=args.steps_offset, progress=not args.quiet,
                           prompt_syntax=args.prompt_syntax, **kwargs)
    for i, (img, path) in enumerate(zip(result.images, paths)):
        save_png(img, path, png_text(result.settings, i, args.n, args), overwrite=args.force)
    return paths


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text (and optionally a picture) → PNG files",
                       description="Generate pictures; the prompt and settings go into each PNG's metadata.")
    p.add_argument("prompt")
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt (what to avoid)")
    p.add_argument("--prompt-syntax", default=None, choices=["compel", "a1111"],
                   help="read weights in the prompt: compel's word+ (words)1.3, or the web UI's (word:1.3) [word] "
                        "(default: plain text); both take prompts longer than 75 tokens")
    p.add_argument("-n", type=int, default=1, metavar="N", help="number of pictures (one seed, one batch)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", default=None, help="ddpm, ddim, pndm, euler, euler_a or dpmpp_2m (default: the model's)")
    p.add_argument("--steps-offset", type=int, default=None, metavar="K",
                   help="added to every timestep (default: SD v1.5's 1); --steps 1000 needs 0")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, in the file name)")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="e.g. 512x512 (default: the model's)")
    p.add_argument("--weights", default=None, metavar="SOURCE",
                   help='"tiny", a .safetensors file, a diffusers folder or a repo id (default: $SDLEARN_WEIGHTS or tiny)')
    p.add_argument("--image", default=None, metavar="FILE", help="start from this picture (image-to-image)")
    p.add_argument("--strength", type=float, default=None, help="with --image: fraction of the steps to run (default 0.8)")
    p.add_argument("--mask", default=None, metavar="FILE", help="with --image: repaint the white part (inpainting)")
    p.add_argument("-o", "--output", default=None, metavar="PATH", help="a .png name or a folder (default: sdlearn-SEED.png)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: $SDLEARN_DEVICE or the best one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlearn", description="Stable Diffusion v1.5 from scratch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="what a checkpoint holds (reads headers only)")
    p.add_argument("checkpoint", help='a .safetensors/.ckpt file, a diffusers folder, "tiny" or a repo id')
    _add_generate(sub)
    sub.add_parser("train", help="train the tiny model: sdlearn train {vae,unet,export,history} … (see sdlearn train -h)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":                  # its own parser, in sdlearn/train.py
        from .train import main as train_main   # only for `sdlearn train`: training imports the dataset and more
        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            print(info(args.checkpoint))
        elif args.command == "generate":
            for path in generate(args):
                print(path)
    except (CheckpointError, ValueError, TypeError, FileExistsError) as exc:
        print(f"sdlearn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlearn: interrupted; no unfinished picture was written", file=sys.stderr)
        return 130
    return 0
