"""What `Pipeline.generate` was asked, checked before any work and put in one place.

Every argument is checked here, before the text encoder, the VAE or the UNet run, and a bad
one gets a one-line error that says what was expected, what was found and what to do:

    steps=0 is out of range: expected 1 ≤ steps ≤ 1000 (the number of denoising steps …)
    height=60 is not a multiple of 8 (the VAE's factor: one latent pixel is 8×8 image pixels); use 56 or 64
    unknown sampler 'plms'; expected one of ddpm, ddim, pndm, euler, euler_a, dpmpp_2m

Sizes too large for the device are refused from an estimate of the activation memory
(`estimate_activation_bytes`), before anything is allocated.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from .configs import ModelConfig
from .device import random_seed
from .images import image_size, image_to_tensor, mask_to_tensor, read_picture
from .prompt_syntax import plain_text
from .samplers import SAMPLERS, leading_timesteps

MAX_STEPS = 1000


@dataclass
class Request:
    """A checked `generate` call. `prompts`/`negatives` hold one entry per image (each prompt
    repeated `num_images` times); pictures are float (·, C, H, W) on the CPU."""
    prompts: list[str]
    negatives: list[str]
    num_images: int
    sampler: str
    sampler_options: dict
    steps: int
    guidance: float
    seed: int
    height: int
    width: int
    latent_shape: tuple[int, int, int, int]
    latents: torch.Tensor | None = None      # unit-variance starting noise, as given
    image: torch.Tensor | None = None        # (1 or prompts, 3, H, W) in [-1, 1]
    mask: torch.Tensor | None = None         # (images, 1, H, W) in {0, 1}
    strength: float | None = None

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs only for g > 1, as in diffusers."""
        return self.guidance > 1

    def settings(self) -> dict:
        """What made the picture (for PNG metadata and notebooks)."""
        s = dict(prompt=self.prompts[::self.num_images], negative_prompt=self.negatives[::self.num_images],
                 sampler=self.sampler, steps=self.steps, guidance=self.guidance, seed=self.seed,
                 height=self.height, width=self.width, num_images=self.num_images, **self.sampler_options)
        if self.image is not None:
            s.update(strength=self.strength, inpainting=self.mask is not None)
        return s


def make_request(pipe, prompt, *, negative_prompt=None, steps=None, guidance=7.5, sampler=None, seed=None,
                 latents=None, height=None, width=None, eta=0.0, callback=None, image=None, strength=0.8,
                 mask=None, num_images=1, karras=False, steps_offset=None, prompt_syntax=None) -> Request:
    """Check `generate`'s arguments against this pipeline and fill in the defaults."""
    image = read_picture(image, "image")          # a file path is decoded here, once
    mask = read_picture(mask, "mask")
    prompts = prompt_list(prompt, "prompt")
    num_images = check_int("num_images", num_images, 1, 10_000, "images per prompt")
    negatives = negative_list(negative_prompt, len(prompts))
    sampler = pipe.default_sampler if sampler is None else sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    steps = check_int("steps", pipe.default_steps if steps is None else steps, 1, MAX_STEPS,
                      "the number of denoising steps; 20–50 is usual")
    guidance = check_float("guidance", guidance, 0.0, math.inf, "the guidance scale; 7.5 is usual, ≤ 1 turns it off")
    if steps_offset is None:
        steps_offset = pipe.defaults.get("steps_offset")          # a diffusers folder's scheduler config
    options = sampler_options(sampler, eta, karras, steps, steps_offset)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None; got {seed!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it receives a StepInfo); got {type(callback).__name__}")
    if mask is not None and image is None:
        raise ValueError("mask= needs image= too: inpainting repaints the white part of the mask in that image")
    if mask is not None and image_size(mask, "mask") != image_size(image):
        (mh, mw), (ih, iw) = image_size(mask, "mask"), image_size(image)
        raise ValueError(f"mask is {mw}×{mh} but image is {iw}×{ih} (W×H); draw the mask on the picture's "
                         "own size so that its white part marks the right pixels")
    if guidance <= 1 and negative_prompt is not None:
        warnings.warn(f"guidance={guidance} ≤ 1 runs no unconditional pass, so negative_prompt is not used",
                      stacklevel=4)

    height, width = output_size(pipe, height, width, image, latents)
    batch = len(prompts) * num_images
    check_size(pipe, height, width, batch, guided=guidance > 1)
    asked = prompts + (negatives if guidance > 1 else [])
    pipe.warn_outside_training([plain_text(text, prompt_syntax) for text in asked], height, width)
    f = pipe.latent_factor
    shape = (batch, pipe.unet.config.in_channels, height // f, width // f)
    if latents is not None:
        check_latents(latents, shape, pipe.latent_dtype)    # float32 for a bfloat16 pipeline

    req = Request(prompts=[p for p in prompts for _ in range(num_images)],
                  negatives=[n for n in negatives for _ in range(num_images)], num_images=num_images,
                  sampler=sampler, sampler_options=options, steps=steps, guidance=guidance,
                  seed=random_seed() if seed is None else seed,
                  height=height, width=width, latent_shape=shape, latents=latents)
    if image is not None:
        req.strength = check_float("strength", strength, 0.0, 1.0, "the fraction of the steps to run on the image")
        req.image = image_to_tensor(image, height, width)
        per_image(req.image, len(prompts), num_images, "image")      # checks the count
        if mask is not None:
            req.mask = per_image(mask_to_tensor(mask, height, width), len(prompts), num_images, "mask")
    return req


def output_size(pipe, height: int | None, width: int | None, image=None, latents=None) -> tuple[int, int]:
    """The picture's (height, width): as given; else the input picture's, rounded down to a
    multiple of 8; else the given latents' × 8; else the model's native size. (Latents: ÷ 8.)"""
    if height is None and width is None:
        m, f = pipe.size_multiple, pipe.latent_factor
        if image is not None:
            h, w = image_size(image)
            height, width = max(m, h // m * m), max(m, w // m * m)
        elif isinstance(latents, torch.Tensor) and latents.ndim == 4:
            height, width = latents.shape[2] * f, latents.shape[3] * f
    return (pipe.native_size[0] if height is None else height, pipe.native_size[1] if width is None else width)


def sampler_options(sampler: str, eta: float, karras: bool, steps: int = 1, steps_offset: int | None = None) -> dict:
    eta = check_float("eta", eta, 0.0, math.inf, "DDIM's η: 0 = deterministic, 1 = DDPM-like")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta={eta} applies to the ddim sampler only; got sampler={sampler!r}. "
                         "Use sampler='ddim' or leave eta at 0")
    if karras and sampler not in ("euler", "euler_a", "dpmpp_2m"):
        raise ValueError(f"karras=True applies to euler, euler_a and dpmpp_2m; got sampler={sampler!r}")
    options = {"eta": eta} if sampler == "ddim" else {}
    if karras:
        options["karras"] = True
    if steps_offset is not None:
        options["steps_offset"] = check_int("steps_offset", steps_offset, 0, MAX_STEPS - 1,
                                           "added to every timestep; SD v1.5 uses 1")
    # The first timestep must exist: with SD's offset of 1, 1000 steps would start at t = 1000.
    leading_timesteps(steps, MAX_STEPS, options.get("steps_offset", 1))
    return options


def prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError(f"{name} is an empty list; pass a string or a list of at least one string")
        bad = next(i for i, p in enumerate(prompt) if not isinstance(p, str))
        raise TypeError(f"{name}[{bad}] is a {type(prompt[bad]).__name__}; expected a list of strings")
    raise TypeError(f"{name} must be a string or a list of strings; got {type(prompt).__name__}")


def check_embeds(pipe, prompt, prompt_embeds, negative_embeds) -> list[str]:
    """`generate(prompt_embeds=…)`: checks the conditioning given instead of a prompt, and returns
    the prompt list that stands for it ("" per row: nothing to tokenize, nothing to warn about)."""
    if prompt_embeds is None:
        raise ValueError("negative_prompt_embeds needs prompt_embeds too; with a text prompt, pass negative_prompt "
                         "as text instead")
    if prompt is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both: prompt_embeds replaces the encoded prompt")
    width = pipe.text_encoder.config.hidden_size
    for name, e in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_embeds)):
        if e is None:
            continue
        if not isinstance(e, torch.Tensor) or e.dim() != 3 or e.shape[-1] != width or not e.is_floating_point():
            got = f"a {e.dtype} tensor of shape {tuple(e.shape)}" if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"{name} must be a float tensor (B, tokens, {width}), the text encoder's output "
                             f"(pipe.encode_prompts); got {got}")
        if e.shape[1] % 77:
            raise ValueError(f"{name} has {e.shape[1]} tokens; the text encoder gives 77 per prompt (77·k for a long "
                             "weighted prompt): pass pipe.encode_prompts' output, or slices of whole 77-token chunks")
    if negative_embeds is not None and negative_embeds.shape[0] not in (1, prompt_embeds.shape[0]):
        raise ValueError(f"negative_prompt_embeds has {negative_embeds.shape[0]} rows, prompt_embeds "
                         f"{prompt_embeds.shape[0]}; pass one row or one per prompt")
    return [""] * prompt_embeds.shape[0]


def negative_list(negative, prompts: int) -> list[str]:
    if negative is None:
        return [""] * prompts
    negatives = prompt_list(negative, "negative_prompt")
    if len(negatives) == 1:
        return negatives * prompts
    if len(negatives) != prompts:
        raise ValueError(f"negative_prompt has {len(negatives)} entries but there are {prompts} prompts; "
                         "pass one string, or one per prompt")
    return negatives


def check_int(name: str, value, lo: int, hi: int, meaning: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int ({meaning}); got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range: expected {lo} ≤ {name} ≤ {hi} ({meaning})")
    return value


def check_float(name: str, value, lo: float, hi: float, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number ({meaning}); got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        bounds = f"≥ {lo} and finite" if hi == math.inf else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}={value} is out of range: expected a number {bounds} ({meaning})")
    return value


def check_latents(latents, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor of shape {shape}; got {type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {tuple(shape)} "
                         "(images, latent channels, height/8, width/8) for this batch and size")
    if latents.dtype != dtype:
        raise ValueError(f"latents are {latents.dtype} but the pipeline's sampler runs in {dtype}; "
                         f"pass latents.to({dtype})")


def check_size(pipe, height, width, batch: int, guided: bool) -> None:
    m = pipe.size_multiple
    for name, v in (("height", height), ("width", width)):
        check_int(name, v, 1, 1 << 20, "an image side in pixels")
        if v % m:
            raise ValueError(f"{name}={v} is not a multiple of {m} (the VAE's factor: one latent pixel is "
                             f"{m}×{m} image pixels); use {max(m, v // m * m)} or {v // m * m + m}")
    need = estimate_activation_bytes(pipe.config, batch, height, width, pipe.dtype, guided)
    free = free_memory_bytes(pipe.device)
    if free is not None and need > free:
        native = "×".join(map(str, pipe.native_size))
        raise ValueError(f"{height}×{width} with batch {batch} needs about {need / 2**30:.1f} GiB of "
                         f"{pipe.device.type} memory for activations but about {free / 2**30:.1f} GiB is free; "
                         f"use a smaller size (native: {native}) or fewer images")


def per_image(x: torch.Tensor, prompts: int, num_images: int, what: str) -> torch.Tensor:
    """One picture (or latent) for all prompts, or one per prompt → one per image."""
    if x.shape[0] not in (1, prompts):
        raise ValueError(f"{x.shape[0]} {what}s for {prompts} prompts; pass one {what}, or one per prompt")
    return x.repeat_interleave(num_images * (prompts if x.shape[0] == 1 else 1), dim=0)


# -- memory -------------------------------------------------------------------------------------

def estimate_activation_bytes(config: ModelConfig, batch: int, height: int, width: int,
                              dtype: torch.dtype, guided: bool = True) -> int:
    """A rough upper estimate of the activation memory of one generation, before allocating any.

    UNet (batch 2B with guidance): the skip connections kept for the up path, (L+1) maps per
    level of c_i channels at (h·w)/4^i pixels, twice over for the working copies, plus the
    transformer's GEGLU projection (8·c_0 channels, 16 with its output) at the first level.
    VAE decoder at full resolution: the last level's c_0-channel maps (several alive) and the
    upsampled c_1-channel input. Attention needs no N×N matrix (PyTorch SDPA's fused kernels).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    u, v = config.unet, config.vae
    f = v.downsample_factor
    hw = (height // f) * (width // f)
    n = batch * (2 if guided else 1)
    per_pixel = sum(2 * (u.layers_per_block + 1) * c / 4 ** i for i, c in enumerate(u.block_out_channels))
    unet = n * hw * (per_pixel + 16 * u.block_out_channels[0])
    c = v.block_out_channels
    vae = batch * height * width * (4 * c[0] + (c[1] if len(c) > 1 else 0))
    return int(max(unet, vae) * itemsize)


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory on the device: CUDA's free bytes; the CPU's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
