"""Plots for the notebooks: image grids with captions (more to come: schedules, attention maps).

Every function returns a matplotlib Figure, so a notebook shows it and a script saves it
(`fig.savefig("grid.png")`). Images may be PIL images, uint8 arrays (H, W, 3), or tensors
(3, H, W): uint8, or float in [0, 1] (as `pipe.generate(...).pixels`).
"""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
import torch


def to_uint8(image) -> np.ndarray:
    """Any image sdlearn passes around → uint8 array (H, W, 3) for display."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor (3, H, W), found shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return t.expand(3, -1, -1).permute(1, 2, 0).numpy()
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an image array (H, W, 3), found shape {a.shape}")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return a


def image_grid(images: Sequence, captions: Sequence[str] | None = None, *, ncols: int = 8,
               size: float = 1.6, fontsize: float = 7):
    """Show images in rows of `ncols`, each with its caption (wrapped) underneath.

    `size` is the side of one tile in inches. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    n = len(images)
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {len(images)} images and {len(captions)} captions; pass one caption per image")
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    text_h = 0.35 if captions is not None else 0.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size + text_h)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(to_uint8(images[i]), interpolation="nearest")
        if captions is not None:
            ax.set_title("\n".join(textwrap.wrap(captions[i], 24)), fontsize=fontsize)
    fig.tight_layout()
    return fig
