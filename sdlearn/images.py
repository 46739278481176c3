"""Pictures in and out of the pipeline: PIL ↔ tensors, masks, and PNG files written safely.

Conventions (those of diffusers' `VaeImageProcessor`, so img2img and inpainting see the same
numbers as diffusers does):

    PIL RGB uint8  →  float (B, 3, H, W) in [-1, 1]:   x = 2 · (pixel / 255) − 1
    mask (white = repaint)  →  (B, 1, H, W) in {0, 1}:  m = [grey / 255 ≥ 0.5]
    pixels (B, 3, H, W) in [0, 1]  →  PIL:               round(255 · x)

A picture of another size is resized with Lanczos filtering, as diffusers does.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .tokenizer import repair_surrogates

def to_uint8(image) -> np.ndarray:
    """Any image sdlearn passes around → uint8 array (H, W, 3) for display."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor (3, H, W), found shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return t.expand(3, -1, -1).permute(1, 2, 0).numpy()
    a = np.array(image.convert("RGB") if hasattr(image, "convert") else image)       # a writable copy
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an image array (H, W, 3), found shape {a.shape}")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return a


def open_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Read a picture file, or say clearly why it cannot be read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file; expected a PNG or JPEG picture")
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{what} {path.name}: not a picture PIL can read ({exc.__class__.__name__}); "
                         "expected a PNG or JPEG file") from None
    except Image.DecompressionBombError as exc:    # a header claiming billions of pixels
        raise ValueError(f"{what} {path.name}: {exc.args[0].split(',')[0]}; expected a picture of a few "
                         "megapixels at most: resize it first") from None


def read_picture(image, what: str = "image") -> Image.Image | torch.Tensor | None:
    """A picture as given to `generate` — a PIL image, a tensor or a file path — as a PIL image
    or a tensor; a path is opened and decoded (once: callers pass the result on). None stays None."""
    if image is None or isinstance(image, (Image.Image, torch.Tensor)):
        return image
    if isinstance(image, (str, os.PathLike)):
        return open_image(image, what)
    raise TypeError(f"{what} must be a PIL image, a tensor or a file path; got {type(image).__name__}")


def _as_pil(image, what: str) -> Image.Image | torch.Tensor:
    if image is None:
        raise TypeError(f"{what} must be a PIL image, a tensor or a file path; got None")
    return read_picture(image, what)


def image_size(image, what: str = "image") -> tuple[int, int]:
    """(height, width) of a PIL image, a path or a (…, H, W) tensor."""
    image = _as_pil(image, what)
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    return image.height, image.width


def image_to_tensor(image, height: int, width: int, what: str = "image") -> torch.Tensor:
    """An RGB picture → float32 (B, 3, height, width) in [-1, 1].

    PIL images must be RGB (no alpha, no palette: say what to convert to) and are resized to
    height × width if needed. Tensors are (3, H, W) or (B, 3, H, W) in [0, 1] — the range of
    `GenerationResult.pixels` — and must already have the size asked for."""
    image = _as_pil(image, what)
    if isinstance(image, torch.Tensor):
        x = _check_tensor(image, 3, height, width, what)
        return x.float() * 2 - 1
    if image.mode != "RGB":
        hint = ("it has an alpha channel; flatten it onto a background first"
                if "A" in image.mode or "transparency" in image.info else "convert it first")
        raise ValueError(f"{what} has PIL mode {image.mode!r}; expected an RGB picture: {hint} "
                         f"(e.g. {what}.convert('RGB'))")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return x * 2 - 1


def mask_to_tensor(mask, height: int, width: int) -> torch.Tensor:
    """A mask (white = repaint, black = keep) → float32 (B, 1, height, width) of 0s and 1s.

    PIL masks may be mode "1", "L" or "RGB" (turned grey as PIL does); tensors (H, W), (1, H, W)
    or (B, 1, H, W) in [0, 1]. Values ≥ 0.5 become 1 (diffusers' binarisation)."""
    mask = _as_pil(mask, "mask")
    if isinstance(mask, torch.Tensor):
        m = mask
        if m.ndim == 2:
            m = m[None]
        m = _check_tensor(m, 1, height, width, "mask").float()
    else:
        if mask.mode not in ("1", "L", "RGB"):
            raise ValueError(f"mask has PIL mode {mask.mode!r}; expected a black-and-white picture "
                             "(mode 'L', '1' or 'RGB'): convert it with mask.convert('L')")
        if mask.mode != "L":
            mask = mask.convert("L")
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.LANCZOS)
        m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return (m >= 0.5).float()


def _check_tensor(x: torch.Tensor, channels: int, height: int, width: int, what: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} tensor has shape {tuple(x.shape)}; expected ({channels}, H, W) or "
                         f"(B, {channels}, H, W) with values in [0, 1]")
    if not x.is_floating_point():
        raise ValueError(f"{what} tensor has dtype {x.dtype}; expected floats in [0, 1] (divide uint8 by 255)")
    if tuple(x.shape[-2:]) != (height, width):
        raise ValueError(f"{what} tensor is {x.shape[-2]}×{x.shape[-1]} (H×W); expected {height}×{width}: "
                         "resize it, or pass height and width to match")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{what} tensor has values in [{lo:.3g}, {hi:.3g}]; expected [0, 1] "
                         "(for [-1, 1] images pass (x + 1) / 2)")
    return x.detach().cpu()


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] → B PIL RGB images, rounded as diffusers' `numpy_to_pil` does."""
    arr = (pixels.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def save_png(image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None, *,
             overwrite: bool = False) -> Path:
    """Write a PNG with `text` as its tEXt/iTXt metadata, atomically.

    The picture goes to a temporary file in the same folder and is renamed into place
    (`os.replace`) only once it is complete, so an interrupted run never leaves half a file.
    An existing file is kept unless `overwrite=True` (FileExistsError)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass --force to overwrite it")
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        # iTXt: UTF-8, so any prompt survives; a lone surrogate (not text, e.g. an undecodable byte
        # of a command-line argument) becomes U+FFFD, as the tokenizer reads it (and warned about).
        info.add_itxt(key, repair_surrogates(str(value), warn=False))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} appeared while writing; not overwriting it (pass --force)")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
