"""The `sdlearn` command (also `python -m sdlearn`).

    sdlearn info CHECKPOINT      what a checkpoint holds: per component tensors, parameters,
                                 dtypes, bytes, and the layout sdlearn detected
"""
from __future__ import annotations

import argparse
import sys

from .weights import COMPONENTS, CheckpointError, open_checkpoint, summarize


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def info(source: str) -> str:
    """The report `sdlearn info` prints, as text. Reads headers only."""
    from .pipeline import resolve_source

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
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlearn", description="Stable Diffusion v1.5 from scratch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="what a checkpoint holds (reads headers only)")
    p.add_argument("checkpoint", help='a .safetensors/.ckpt file, a diffusers folder, "tiny" or a repo id')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            print(info(args.checkpoint))
    except (CheckpointError, ValueError, FileExistsError) as exc:
        print(f"sdlearn: error: {exc}", file=sys.stderr)
        return 2
    return 0
