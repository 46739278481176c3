"""Plots for the notebooks: image grids with captions, noise schedules, an image noised to a
timestep, 2-D sampler trajectories (more to come: attention maps).

matplotlib.pyplot is imported inside each function, not here: importing it picks a plotting
backend and takes about half a second, which `import sdlearn` should not pay.

Every plotting function returns a matplotlib Figure, so a notebook shows it and a script saves it
(`fig.savefig("grid.png")`). Images may be PIL images, uint8 arrays (H, W, 3), or tensors
(3, H, W): uint8, or float in [0, 1] (as `pipe.generate(...).pixels`).
"""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
import torch

from .images import to_uint8


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


# ---- noise schedules and the reverse process (notebook 03) --------------------------------

SCHEDULE_QUANTITIES = {
    "betas": "β_t",
    "alphas_cumprod": "ᾱ_t",
    "sqrt_alphas_cumprod": "√ᾱ_t  (signal)",
    "sqrt_one_minus_alphas_cumprod": "√(1−ᾱ_t)  (noise)",
    "log_snr": "log SNR(t) = log ᾱ_t/(1−ᾱ_t)",
    "posterior_variance": "β̃_t (posterior variance)",
}


def plot_schedules(schedules, quantities: Sequence[str] = ("betas", "alphas_cumprod"), *,
                   size: tuple[float, float] = (4.0, 2.8), logy: Sequence[str] = ()):
    """One panel per quantity (names in SCHEDULE_QUANTITIES), one line per noise schedule.

    `schedules`: a NoiseSchedule, a list of them (labelled by `.name`) or a dict label → schedule.
    Quantities named in `logy` get a logarithmic y axis. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    if hasattr(schedules, "alphas_cumprod"):
        schedules = [schedules]
    if not isinstance(schedules, dict):
        schedules = {s.name: s for s in schedules}
    unknown = [q for q in quantities if q not in SCHEDULE_QUANTITIES]
    if unknown:
        raise ValueError(f"unknown quantities {unknown}; expected some of {list(SCHEDULE_QUANTITIES)}")
    fig, axes = plt.subplots(1, len(quantities), figsize=(size[0] * len(quantities), size[1]), squeeze=False)
    for ax, q in zip(axes[0], quantities):
        for label, s in schedules.items():
            values = s.log_snr() if q == "log_snr" else getattr(s, q)
            ax.plot(values.numpy(), label=label)
        ax.set_title(SCHEDULE_QUANTITIES[q], fontsize=10)
        ax.set_xlabel("timestep t (0-based)")
        if q in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def noise_image(image, t: int, schedule, seed: int = 0) -> torch.Tensor:
    """An image noised by the forward process at timestep t: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with
    x_0 the image scaled to [-1, 1] and ε from `seed` (the same ε for every t).
    Returns a float tensor (3, H, W) in [0, 1] (x_t is clipped for display)."""
    x0 = torch.from_numpy(to_uint8(image)).permute(2, 0, 1).float() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    xt = schedule.q_sample(x0[None], int(t), eps[None])[0]
    return ((xt + 1) / 2).clamp(0, 1)


def plot_trajectories(paths: dict, density=None, *, ncols: int = 4, size: float = 2.6,
                      lim: float = 3.0, show: int = 30):
    """2-D sampler trajectories, one panel per entry of `paths` (label → tensor (steps+1, n, 2)).

    The first `show` points get their whole path drawn; every point's end is a dot. `density`,
    if given, is anything with `.log_prob(points (m, 2))` (e.g. sdlearn.toy.GaussianMixture) and is
    drawn underneath. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    n = len(paths)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size), squeeze=False)
    if density is not None:
        g = torch.linspace(-lim, lim, 120)
        grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
        dens = density.log_prob(grid).exp().reshape(120, 120).numpy()
    for ax in axes.flat:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax, (label, path) in zip(axes.flat, paths.items()):
        path = path.detach().cpu()
        if density is not None:
            ax.contourf(g.numpy(), g.numpy(), dens, levels=6, cmap="Blues")
        for i in range(min(show, path.shape[1])):
            ax.plot(path[:, i, 0].numpy(), path[:, i, 1].numpy(), lw=0.6, alpha=0.7)
        ax.scatter(path[-1, :, 0].numpy(), path[-1, :, 1].numpy(), s=2, c="k")
        ax.set_title(label, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


# ---- latents (notebook 05) -------------------------------------------------------------------

def plot_latent_channels(latents: torch.Tensor, image=None, *, titles: Sequence[str] | None = None,
                         size: float = 2.0, cmap: str = "RdBu_r"):
    """One panel per channel of a latent (C, h, w) or (1, C, h, w), all on one colour scale that
    is symmetric about 0 (with the default map: blue negative, white 0, red positive), with one
    colour bar. `image` (anything `to_uint8` takes), if given, is shown first for reference.
    Returns the Figure."""
    import matplotlib.pyplot as plt

    z = latents.detach().float().cpu()
    if z.ndim == 4 and z.shape[0] == 1:
        z = z[0]
    if z.ndim != 3:
        raise ValueError(f"expected one latent (C, h, w) or (1, C, h, w), found shape {tuple(latents.shape)}")
    c = z.shape[0]
    titles = list(titles) if titles is not None else [f"channel {i}" for i in range(c)]
    if len(titles) != c:
        raise ValueError(f"got {c} channels and {len(titles)} titles; pass one title per channel")
    offset = 0 if image is None else 1
    fig, axes = plt.subplots(1, c + offset, figsize=((c + offset) * size + 0.6, size), squeeze=False)
    axes = axes[0]
    if image is not None:
        axes[0].imshow(to_uint8(image), interpolation="nearest")
        axes[0].set_title("image", fontsize=9)
    m = max(z.abs().max().item(), 1e-12)
    for ax, channel, title in zip(axes[offset:], z, titles):
        shown = ax.imshow(channel.numpy(), cmap=cmap, vmin=-m, vmax=m, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=list(axes), fraction=0.02, pad=0.02)
    return fig


# ---- tokens and text attention (notebook 02) ---------------------------------------------------

def token_labels(tokenizer, ids) -> list[str]:
    """Short axis labels for token ids: the vocabulary symbol without its word end `</w>`
    ("red", ","), `<start>` and `<end>` for the specials (every padding end token too).
    `ids`: a list or a 1-D tensor."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    special = {tokenizer.bos_token_id: "<start>", tokenizer.eos_token_id: "<end>"}
    return [special.get(i) or tokenizer.decode([i]) or tokenizer.decoder[i] for i in ids]


def plot_token_heatmaps(matrices, labels: Sequence[str] | None = None, *,
                        titles: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                        ncols: int = 4, size: float = 2.6, cmap: str = "viridis",
                        vmin: float | None = None, vmax: float | None = None, colorbar: bool = True):
    """Heatmaps of matrices indexed by tokens (attention maps, masks, similarities), one panel each.

    `matrices`: one (n, m) tensor/array, a (k, n, m) stack or a list of k (n, m). Rows are labelled
    by `labels` (queries: "who is looking"), columns by `col_labels` (keys; default `labels`).
    All panels share one colour scale: [vmin, vmax], by default the data's range. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    mats = [torch.as_tensor(np.asarray(m.detach().float().cpu() if isinstance(m, torch.Tensor) else m))
            for m in (matrices if isinstance(matrices, (list, tuple)) else
                      (matrices[None] if np.ndim(matrices) == 2 else matrices))]
    if not mats or any(m.ndim != 2 or m.shape != mats[0].shape for m in mats):
        raise ValueError(f"expected one or more matrices of one shape (n, m), found shapes "
                         f"{[tuple(m.shape) for m in mats]}")
    n, m = mats[0].shape
    col_labels = col_labels if col_labels is not None else (labels if n == m else None)
    for name, given, want in (("labels", labels, n), ("col_labels", col_labels, m)):
        if given is not None and len(given) != want:
            raise ValueError(f"{name} has {len(given)} entries but the matrices have {want} "
                             f"{'rows' if name == 'labels' else 'columns'}; pass one label per token")
    titles = list(titles) if titles is not None else [""] * len(mats)
    if len(titles) != len(mats):
        raise ValueError(f"got {len(mats)} matrices and {len(titles)} titles; pass one title per matrix")
    lo = min(float(x.min()) for x in mats) if vmin is None else vmin
    hi = max(float(x.max()) for x in mats) if vmax is None else vmax
    ncols = max(1, min(ncols, len(mats)))
    nrows = -(-len(mats) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size + (0.6 if colorbar else 0), nrows * size),
                             squeeze=False)
    fontsize = 7 if max(n, m) <= 16 else 5
    for ax, mat, title in zip(axes.flat, mats, titles):
        shown = ax.imshow(mat.numpy(), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        for set_ticks, set_labels, names in ((ax.set_yticks, ax.set_yticklabels, labels),
                                             (ax.set_xticks, ax.set_xticklabels, col_labels)):
            if names is None or len(names) > 40:
                set_ticks([])
            else:
                set_ticks(range(len(names)))
                set_labels(names, fontsize=fontsize)
        ax.tick_params(axis="x", labelrotation=90)
    for ax in list(axes.flat)[len(mats):]:
        ax.axis("off")
    fig.tight_layout()
    if colorbar:
        fig.colorbar(shown, ax=list(axes.flat), fraction=0.02, pad=0.02)
    return fig


# ---- sampling and attention maps (notebooks 06, 07) ---------------------------------------------

def image_table(rows: dict, col_titles: Sequence[str] | None = None, *, size: float = 1.2,
                fontsize: float = 7, captions: dict | None = None):
    """Images in labelled rows: `rows` maps a row label to its images (every row the same
    length; None leaves a cell empty), `col_titles` names the columns (a step, a strength, …) and
    `captions`, if given, maps a row label to one caption per image, written under each.
    Sampler × steps grids, filmstrips along a trajectory, sweeps. Returns the Figure."""
    import matplotlib.pyplot as plt

    rows = dict(rows)
    lengths = {label: len(images) for label, images in rows.items()}
    if not rows or len(set(lengths.values())) != 1:
        raise ValueError(f"expected rows of one length, found {lengths}; pad short rows with None")
    ncols = next(iter(lengths.values()))
    if col_titles is not None and len(col_titles) != ncols:
        raise ValueError(f"got {len(col_titles)} column titles for {ncols} columns; pass one per column")
    captions = captions or {}
    for label, caps in captions.items():
        if label not in rows or len(caps) != ncols:
            raise ValueError(f"captions[{label!r}] must name a row and hold {ncols} captions")
    text_h = 0.25 if captions else 0.0
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * size + 0.9, len(rows) * (size + text_h) + 0.3),
                             squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if image is not None:
                ax.imshow(to_uint8(image), interpolation="nearest")
            if r == 0 and col_titles is not None:
                ax.set_title(str(col_titles[c]), fontsize=fontsize + 1)
            if label in captions:
                ax.set_xlabel(captions[label][c], fontsize=fontsize)
        axes[r][0].set_ylabel(str(label), fontsize=fontsize + 1)
    fig.tight_layout()
    return fig


def heatmap_overlay(image, heat, *, alpha: float = 0.5, cmap: str = "jet", vmin: float | None = None,
                    vmax: float | None = None) -> np.ndarray:
    """A heat map laid over an image: uint8 (H, W, 3).

    heat (h, w), e.g. a word's attention map, is upsampled (bilinear) to the image's size if it
    is smaller, scaled so that [vmin, vmax] (default: its own minimum and maximum) becomes
    [0, 1] and clipped, coloured by `cmap`, and blended: out = α · cmap(heat) + (1 − α) · image.
    """
    import matplotlib

    base = to_uint8(image).astype(np.float32) / 255
    h = torch.as_tensor(np.asarray(heat.detach().float().cpu() if isinstance(heat, torch.Tensor) else heat,
                                   dtype=np.float32))
    if h.ndim != 2:
        raise ValueError(f"expected a heat map (h, w), found shape {tuple(h.shape)}")
    if tuple(h.shape) != base.shape[:2]:
        h = torch.nn.functional.interpolate(h[None, None], size=base.shape[:2], mode="bilinear",
                                            align_corners=False)[0, 0]
    lo = float(h.min()) if vmin is None else vmin
    hi = float(h.max()) if vmax is None else vmax
    h = ((h - lo) / (hi - lo) if hi > lo else torch.zeros_like(h)).clamp(0, 1).numpy()
    colour = matplotlib.colormaps[cmap](h)[..., :3]
    return (np.clip(alpha * colour + (1 - alpha) * base, 0, 1) * 255).round().astype(np.uint8)


def plot_word_maps(image, word_maps, words: Sequence | None = None, *, size: float = 1.6,
                   alpha: float = 0.5, cmap: str = "jet", shared_scale: bool = False, fontsize: float = 8):
    """The image, then one panel per word with its attention map laid over the image.

    `word_maps`: an `attention_maps.WordMaps` (or anything with `.words` and `.maps` (n, H, W)).
    `words`: which ones (texts or positions; default all). Each title gives the word's share of
    the attention, the mean of its map (every pixel's attention sums to 1 over the 77 tokens).
    Each map's colours span its own minimum to maximum, or all maps' with `shared_scale`.
    Returns the Figure.
    """
    import matplotlib.pyplot as plt

    chosen = list(range(len(word_maps.words))) if words is None else \
        [w if isinstance(w, int) else word_maps.words.index(w) for w in words]
    maps = [word_maps.maps[i].float().cpu() for i in chosen]
    vmin = min(float(m.min()) for m in maps) if shared_scale and maps else None
    vmax = max(float(m.max()) for m in maps) if shared_scale and maps else None
    fig, axes = plt.subplots(1, len(chosen) + 1, figsize=((len(chosen) + 1) * size, size + 0.4), squeeze=False)
    axes = axes[0]
    axes[0].imshow(to_uint8(image), interpolation="nearest")
    axes[0].set_title("image", fontsize=fontsize)
    for ax, i, m in zip(axes[1:], chosen, maps):
        ax.imshow(heatmap_overlay(image, m, alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax), interpolation="nearest")
        ax.set_title(f"{word_maps.words[i]}\n{100 * m.mean().item():.1f} %", fontsize=fontsize)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


# ---- the tiny model's training and alignment (notebook 08) --------------------------------------

ALIGNMENT_COLOURS = {"colour": "tab:red", "shape": "tab:blue", "position": "tab:green", "found": "tab:grey"}


def plot_alignment(series: dict, *, xlabel: str, attributes: Sequence[str] = ("colour", "shape", "position"),
                   title: str | None = None, size: tuple[float, float] = (6, 3), logx: bool = False):
    """How often the analyser reads back what was asked, against a setting (guidance scale,
    training step, …): one line per attribute (its colour) and series (its line style).

    `series` maps a label to {x: scores}, scores as `analyser.score_alignment` returns them
    (fractions), e.g. {"g = 5": {1000: {"colour": 0.92, …}, 2000: …}, "g = 1": {…}}.
    The y axis is in percent. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    if len(series) > len(styles):
        raise ValueError(f"got {len(series)} series; at most {len(styles)} line styles tell them apart")
    fig, ax = plt.subplots(figsize=size)
    for style, (label, points) in zip(styles, series.items()):
        xs = sorted(points)
        for attribute in attributes:
            ax.plot(xs, [100 * points[x][attribute] for x in xs], style, marker="o", markersize=3,
                    color=ALIGNMENT_COLOURS.get(attribute), label=f"{attribute}, {label}" if label else attribute)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("read back (%)")
    ax.set_ylim(0, 104)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=len(series), loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
