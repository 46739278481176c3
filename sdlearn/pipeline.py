"""The pipeline: the three networks, the tokenizer and the noise schedule, loaded together.

    pipe = sdlearn.load_pipeline("tiny")                        # the bundled model
    pipe = sdlearn.load_pipeline("v1-5-pruned-emaonly.safetensors")
    pipe = sdlearn.load_pipeline("path/to/diffusers-folder")
    pipe = sdlearn.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")   # via huggingface_hub

    result = pipe.generate("a red circle on the left", seed=0)
    result.images[0]                       # a PIL image
    result.pixels                          # (B, 3, H, W) in [0, 1], float32 on the CPU
    result.latents                         # the final latents (B, 4, H/8, W/8)

What `generate` does, in order (diffusers' StableDiffusionPipeline, step for step):

    context  = CLIP([negative prompts, prompts])          both halves in one batch, once
    x_T      = randn(B, 4, H/8, W/8; CPU generator seeded with `seed`) · σ_init
    for t in the sampler's timesteps:
        ε_u, ε_c = UNet([x_in, x_in], t, context),   x_in = scale_input(x, t)
        ε̂ = ε_u + g · (ε_c − ε_u)                        classifier-free guidance (none if g ≤ 1)
        x  = sampler.step(ε̂, t, x)                        → also x̂₀, for previews
    pixels = VAE.decode(x / scaling_factor) / 2 + 1/2

Image-to-image starts from the picture's latents noised to the strength's first timestep
instead of x_T; inpainting (a standard 4-channel model) also, after every step, puts back the
known region (mask = 0) of the picture's latents noised to the next step's level:

    x ← (1 − m) · add_noise(z_image, ε, t_next) + m · x       (diffusers' 4-channel inpainting)

The 9-channel SD inpainting checkpoints (mask and masked picture as extra UNet inputs) are
refused when loading (sdlearn/weights.py); a standard model with `mask=` inpaints as above.

Defaults: `steps` and `sampler` come from the checkpoint's `sdlearn_defaults` metadata when it
has one (JSON such as {"sampler": "ddim", "steps": 20}, written by the tiny model's export);
otherwise they are those of the SD v1.5 repo (PNDM, 50 steps, as diffusers runs it). `guidance` is 7.5; the size is the model's native one
(UNet sample_size × the VAE's factor 8: 512×512 for SD v1.5, 64×64 for the tiny model).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .configs import ModelConfig
from .device import choose_threads, default_dtype, resolve_device, using_threads
from .weights import COMPONENTS, CheckpointError, load_component, open_checkpoint

TINY_PATH = Path(__file__).resolve().parent / "data" / "tiny.safetensors"

# What to fetch from a Hugging Face repo in the diffusers layout (nothing else is downloaded).
HUB_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
             "tokenizer/*.json", "tokenizer/merges.txt"]
HUB_WEIGHTS = {"": ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"],
               "fp16": ["unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
                        "text_encoder/model.fp16.safetensors"]}


# Diffusers' defaults for the SD v1.5 repo: its scheduler is a PNDMScheduler, and
# StableDiffusionPipeline runs num_inference_steps=50 at guidance_scale=7.5.
SD15_DEFAULTS = {"sampler": "pndm", "steps": 50}


class StopGeneration(Exception):
    """Raise it in a `generate` callback to stop early; `generate` returns what there is."""


@dataclass
class StepInfo:
    """What a `generate` callback receives after each step.

    `latents` is the sampler's current x (the Euler-type samplers keep it in their own
    x_t/√ᾱ_t scale; the others hold x_t itself); `x0_hat` is the step's estimate of the clean
    latents (diffusion scale). `preview()` turns either into a cheap RGB picture at 1/8 size.
    """
    step: int                 # 0-based index of the step just done
    num_steps: int            # steps in this run (PNDM's repeated timestep counts)
    timestep: int | float
    latents: torch.Tensor     # (B, 4, h, w)
    x0_hat: torch.Tensor      # (B, 4, h, w)
    pipeline: "Pipeline" = field(repr=False)

    def preview(self, which: str = "x0_hat") -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] from `x0_hat` or `latents`, through the pipeline's LatentPreview."""
        if which not in ("x0_hat", "latents"):
            raise ValueError(f"which must be 'x0_hat' or 'latents'; got {which!r}")
        return self.pipeline.latent_preview(getattr(self, which).float())

    def preview_images(self, which: str = "x0_hat", upscale: int = 8):
        """The preview as PIL images, enlarged `upscale`× (8: the image size)."""
        from .images import to_pil
        small = self.preview(which)
        return to_pil(torch.nn.functional.interpolate(small.cpu(), scale_factor=upscale, mode="nearest"))


@dataclass
class GenerationResult:
    images: list                     # B PIL images
    pixels: torch.Tensor             # (B, 3, H, W) float32 in [0, 1], on the CPU
    latents: torch.Tensor            # (B, 4, H/8, W/8): the final latents (the current ones after an early stop)
    seed: int                        # the seed used (drawn at random when none was given)
    settings: dict                   # prompt, negative_prompt, sampler, steps, guidance, size, …, cpu_threads
    steps_done: int                  # sampler steps run
    stopped_early: bool = False      # a callback stopped the run; pixels then show the last x̂₀
    attention_maps: list | None = None   # one attention_maps.WordMaps per image, if asked for


@dataclass(eq=False)
class Pipeline:
    """Everything needed to turn a prompt into an image."""
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    schedule: object
    device: torch.device
    dtype: torch.dtype
    config: ModelConfig
    source: str = ""
    defaults: dict = field(default_factory=dict)   # {"sampler", "steps"} from the checkpoint, if any
    vocabulary: dict | None = None     # {"words", "grammar"} for a model trained on a closed grammar (tiny)
    _preview: object = field(default=None, init=False, repr=False)
    _warned: set = field(default_factory=set, init=False, repr=False)

    def __repr__(self) -> str:
        params = {c: sum(p.numel() for p in getattr(self, c).parameters()) / 1e6 for c in COMPONENTS}
        sizes = ", ".join(f"{c} {n:.1f}M" for c, n in params.items())
        return f"Pipeline({self.source!r}, {self.device}, {str(self.dtype).replace('torch.', '')}; {sizes})"

    # -- sizes and defaults -------------------------------------------------------------------

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel (the VAE's downsampling): 8."""
        return self.vae.config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor (8). The UNet takes any latent
        size (it rounds odd sides up on the way down and back on the way up, as diffusers does)."""
        return self.latent_factor

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at: UNet sample_size × the VAE's factor."""
        side = self.unet.config.sample_size * self.latent_factor
        return side, side

    @property
    def default_sampler(self) -> str:
        return self.defaults.get("sampler", SD15_DEFAULTS["sampler"])

    @property
    def default_steps(self) -> int:
        return self.defaults.get("steps", SD15_DEFAULTS["steps"])

    def warn_outside_training(self, texts: list[str], height: int, width: int) -> None:
        """For a model that knows only a small grammar (the tiny model: `vocabulary` from its
        metadata), warn once per word it never saw and once per size other than its own: it
        draws colourful nonsense for them, without an error. Models without a declared
        vocabulary (SD v1.5) are never checked."""
        if self.vocabulary is None:
            return
        known = set(self.vocabulary["words"])
        native = "×".join(map(str, self.native_size))
        unknown = sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())} - known - self._warned)
        if unknown:
            self._warned.update(unknown)
            words = ", ".join(repr(w) for w in unknown)
            warnings.warn(f"{Path(self.source).name or self.source}: this model was trained only on captions of its "
                          f"shapes grammar ({len(known)} words) at {native}; it never saw {words} and will draw "
                          f"nonsense for {'them' if len(unknown) > 1 else 'it'}. It knows prompts such as "
                          f"{self.vocabulary['grammar'][0]!r} (`sdlearn info {self.source}` lists them)", stacklevel=4)
        if (height, width) != self.native_size and (height, width) not in self._warned:
            self._warned.add((height, width))
            warnings.warn(f"{width}×{height} is not this model's size: it was trained on {native} pictures only, "
                          f"and other sizes come out as colourful nonsense; use height={self.native_size[0]}, "
                          f"width={self.native_size[1]}", stacklevel=4)

    @property
    def latent_preview(self):
        """A LatentPreview fitted once on this pipeline's VAE (lazily, then cached)."""
        if self._preview is None:
            from .preview import LatentPreview
            with torch.inference_mode():
                images = preview_training_images().to(self.device, self.dtype)
                self._preview = LatentPreview.fit(self.vae, images)
        return self._preview

    # -- speed ---------------------------------------------------------------------------------

    def compile(self, mode: str | None = None, *, vae: bool = True, **options) -> "Pipeline":
        """Opt in to `torch.compile` for the UNet (and the VAE decoder); returns the pipeline.

        The first call at each new size or batch compiles (tens of seconds to minutes); later
        calls run the compiled code. Modules stay the same objects, with the same state dicts.
        `mode` is torch.compile's:
            None ("default")   fuse elementwise work into the matrix products' neighbours
            "reduce-overhead"  also CUDA graphs: the whole UNet call replayed as one launch (GPU,
                               fixed shapes; the output is overwritten by the next call)
            "max-autotune"     also time alternative kernels while compiling (slowest to compile)
        `options` go to torch.compile (e.g. fullgraph=True, dynamic=False). Results stay within
        float rounding of the eager pipeline (tested against it at the parity tolerance). On the
        CPU the eager UNet's own oneDNN paths step aside while the compiler traces it.
        """
        self.unet.compile(mode=mode, **options)
        if vae:
            self.vae.decoder.compile(mode=mode, **options)
        return self

    @property
    def cpu_threads(self) -> int:
        """The CPU threads `generate` runs on (sdlearn.device.choose_threads): $SDLEARN_THREADS, or
        the count you set, or one for a UNet too small to gain from more (the tiny model), or
        all of torch's (SD v1.5). torch's own count is restored when `generate` returns."""
        from .unet import flops_per_call
        return choose_threads(flops_per_call(self.unet.config) if self.device.type == "cpu" else None)

    # -- text → image -------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None = None) -> torch.Tensor:
        """CLIP's last hidden states: (B, 77, width), or (2B, 77, width) for [negatives, prompts]."""
        texts = prompts if negatives is None else list(negatives) + list(prompts)
        return self.text_encoder(self.tokenizer(texts).to(self.device))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents (B, 4, h, w) → pixels (B, 3, 8h, 8w) in [0, 1], float32 on the CPU."""
        images = self.vae.decode(latents.to(self.device, self.dtype) / self.vae.scaling_factor)
        return (images / 2 + 0.5).clamp(0, 1).float().cpu()

    def generate(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, guidance: float = 7.5, sampler: str | None = None,
                 seed: int | None = None, latents: torch.Tensor | None = None, height: int | None = None,
                 width: int | None = None, eta: float = 0.0, callback: Callable | None = None, image=None,
                 strength: float = 0.8, mask=None, num_images: int = 1, karras: bool = False,
                 steps_offset: int | None = None, attention_maps: bool = False,
                 progress: bool = True) -> GenerationResult:
        """Prompt(s) → images. See the module docstring for the algorithm.

        prompt           a string, or a list of strings (one image each)
        negative_prompt  what to steer away from (the unconditional half of guidance); default ""
        steps, sampler   default: the checkpoint's (`pipe.default_steps`, `pipe.default_sampler`);
                         samplers: ddpm, ddim, pndm, euler, euler_a, dpmpp_2m
        guidance         classifier-free guidance scale g ≥ 0; g ≤ 1 runs no unconditional pass
        seed             starting noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed));
                         the same generator then feeds the VAE's posterior sample and the
                         stochastic samplers, in diffusers' order. None: a random seed (result.seed)
        latents          unit-variance starting noise (B, 4, H/8, W/8) in the pipeline's dtype,
                         instead of the seed's; the sampler scales it by its initial σ (with an
                         image: the noise added to the picture's latents)
        height, width    multiples of `pipe.size_multiple`; default the native size (or the image's)
        eta              DDIM's η (ddim only)
        callback         callback(StepInfo) after every step; return False or raise StopGeneration
                         to stop early (the result then shows the last x̂₀)
        image, strength  image-to-image: a PIL RGB image, a file path or a (B, 3, H, W) tensor in
                         [0, 1]; strength ∈ [0, 1] is the fraction of the steps to run
        mask             inpainting (needs image): white (≥ 0.5) = repaint, black = keep
        num_images       images per prompt
        karras           Karras σ spacing (euler, euler_a, dpmpp_2m)
        steps_offset     added to every timestep of the "leading" spacing; None: SD v1.5's 1
                         (50 steps: 981 … 1). 1000 steps need 0 (the whole chain 999 … 0)
        attention_maps   also return per-word cross-attention maps (result.attention_maps)
        progress         show a tqdm progress bar

        It runs on `pipe.cpu_threads` CPU threads (one for the tiny model; $SDLEARN_THREADS or a
        count set with torch.set_num_threads takes precedence) and restores torch's count after.
        """
        from .request import make_request
        from .samplers import get_sampler

        threads = self.cpu_threads
        with torch.inference_mode(), using_threads(threads):
            req = make_request(self, prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                               sampler=sampler, seed=seed, latents=latents, height=height, width=width, eta=eta,
                               callback=callback, image=image, strength=strength, mask=mask,
                               num_images=num_images, karras=karras, steps_offset=steps_offset)
            generator = torch.Generator("cpu").manual_seed(req.seed)
            sched = get_sampler(req.sampler, self.schedule, **req.sampler_options)
            context = self.encode_prompts(req.prompts, req.negatives if req.guided else None)
            start = self._start(req, sched, generator)
            run = self._denoise(req, sched, start, context, generator, callback, attention_maps, progress)
            pixels = self.decode(run.x0_hat if run.stopped else run.x)
            maps = None
            if attention_maps:
                from .attention_maps import word_maps
                tokens = run.recorder.token_maps((req.height, req.width))
                maps = [word_maps(self.tokenizer, p, tokens[b]) for b, p in enumerate(req.prompts)]
        from .images import to_pil
        return GenerationResult(images=to_pil(pixels), pixels=pixels, latents=run.x, seed=req.seed,
                                settings={**req.settings(), "source": self.source, "cpu_threads": threads},
                                steps_done=run.done,
                                stopped_early=run.stopped, attention_maps=maps)

    def _start(self, req, sched, generator) -> "_Start":
        """The timesteps to visit and the starting x.

        text → image:  x = ε · σ_init over all the steps
        image → image: z ~ q(z | image) (the generator's first numbers), x = add_noise(z·s, ε, t₀)
                       over the last `strength` of the steps (diffusers' img2img)
        inpainting:    as image → image, but pure noise at strength 1 (diffusers' 4-channel inpainting)
        """
        from .request import per_image
        from .samplers import randn_like_diffusers

        def unit_noise():
            if req.latents is not None:
                return req.latents.to(self.device)
            return torch.randn(req.latent_shape, generator=generator, dtype=self.dtype).to(self.device)

        if req.image is None:
            sched.set_timesteps(req.steps)
            noise = unit_noise()
            return _Start(sched.timesteps, noise * sched.init_noise_sigma, noise)

        timesteps = sched.timesteps_for_strength(req.steps, req.strength)
        # Each picture is encoded once (as diffusers does), then repeated per image.
        z_first = self.vae.encode(req.image.to(self.device, self.dtype)).sample(generator) * self.vae.scaling_factor
        z_image = per_image(z_first, req.batch // req.num_images, req.num_images, "image")
        noise = unit_noise()
        if req.mask is not None and req.strength == 1.0:
            x = noise * sched.init_noise_sigma
        else:
            x = sched.add_noise(z_image, noise, timesteps[:1].repeat(req.batch))
        mask = None
        if req.mask is not None:
            # diffusers also encodes the masked picture (used by 9-channel models only): draw that
            # posterior sample's noise too, so that stochastic samplers see the same numbers.
            randn_like_diffusers(z_first, generator)
            mask = torch.nn.functional.interpolate(req.mask, size=req.latent_shape[2:])   # nearest, as diffusers
            mask = mask.to(self.device, self.dtype)
        return _Start(timesteps, x, noise, z_image, mask)

    def _denoise(self, req, sched, start, context, generator, callback, attention_maps, progress) -> "_Run":
        """The loop: guided ε, one sampler step, the inpainting blend, the callback."""
        from tqdm.auto import tqdm

        recorder = nullcontext()
        if attention_maps:
            from .attention_maps import CrossAttentionMaps
            rows = slice(req.batch, 2 * req.batch) if req.guided else slice(0, req.batch)
            recorder = CrossAttentionMaps(rows=rows, latent_size=req.latent_shape[2:])
        timesteps, x, n = start.timesteps, start.x, len(start.timesteps)
        run = _Run(x=x, x0_hat=None, done=0, stopped=False, recorder=recorder)
        bar = tqdm(total=n, desc=req.sampler, disable=not progress, leave=False)
        for i, t in enumerate(timesteps):
            x_in = sched.scale_input(x, t)
            with recorder:
                eps = self.unet(torch.cat([x_in, x_in]) if req.guided else x_in, t, context)
            if req.guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + req.guidance * (eps_cond - eps_uncond)
            out = sched.step(eps, t, x, generator=generator)
            x = out.prev_sample
            if start.mask is not None:      # keep the known region, noised to the next step's level
                known = start.z_image if i == n - 1 else sched.add_noise(start.z_image, start.noise, timesteps[i + 1:i + 2])
                x = (1 - start.mask) * known + start.mask * x
            run.x, run.x0_hat, run.done = x, out.pred_original_sample, i + 1
            bar.update()
            if callback is not None and _asks_to_stop(callback, StepInfo(i, n, t.item(), x, run.x0_hat, self)) \
                    and i < n - 1:
                run.stopped = True
                break
        bar.close()
        return run


@dataclass
class _Start:
    timesteps: torch.Tensor
    x: torch.Tensor                         # the sampler's starting x
    noise: torch.Tensor                     # the unit noise ε in it
    z_image: torch.Tensor | None = None     # the picture's latents (img2img, inpainting)
    mask: torch.Tensor | None = None        # latent-size mask, 1 = repaint (inpainting)


@dataclass
class _Run:
    x: torch.Tensor
    x0_hat: torch.Tensor | None
    done: int
    stopped: bool
    recorder: object


def _asks_to_stop(callback, info: StepInfo) -> bool:
    try:
        return callback(info) is False
    except StopGeneration:
        return True


def preview_training_images(size: int = 64) -> torch.Tensor:
    """Pictures the latent preview is fitted on, drawn here so nothing is downloaded: the shapes
    dataset's first samples plus colour fields (six hues, grey levels, two gradients).
    (N, 3, size, size) in [-1, 1]."""
    from . import shapes
    pics = [torch.from_numpy(shapes.sample(i).image).permute(2, 0, 1).float() / 255 for i in range(8)]
    if pics[0].shape[-1] != size:
        pics = [torch.nn.functional.interpolate(p[None], size=(size, size), mode="bilinear")[0] for p in pics]
    for rgb in list(shapes.COLOURS.values()) + [(0, 0, 0), (128, 128, 128), (255, 255, 255)]:
        pics.append(torch.tensor(rgb, dtype=torch.float32).div(255)[:, None, None].expand(3, size, size))
    ramp = torch.linspace(0, 1, size)
    pics.append(torch.stack([ramp[None].expand(size, size), ramp[:, None].expand(size, size),
                             1 - ramp[None].expand(size, size)]))
    pics.append(torch.stack([1 - ramp[:, None].expand(size, size), ramp[None].expand(size, size).flip(1),
                             ramp[:, None].expand(size, size)]))
    return torch.stack(pics) * 2 - 1


def read_defaults(metadata: dict[str, str], name: str = "checkpoint") -> dict:
    """The generation defaults a checkpoint carries in its `sdlearn_defaults` metadata
    (JSON such as {"sampler": "ddim", "steps": 20}); {} when it has none."""
    from .request import MAX_STEPS
    from .samplers import SAMPLERS

    raw = metadata.get("sdlearn_defaults")
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{name}: its sdlearn_defaults metadata is not JSON ({exc})") from None
    out = {}
    if isinstance(d, dict) and d.get("sampler") in SAMPLERS:
        out["sampler"] = d["sampler"]
    if isinstance(d, dict) and isinstance(d.get("steps"), int) and 1 <= d["steps"] <= MAX_STEPS:
        out["steps"] = d["steps"]
    if not isinstance(d, dict) or len(out) != len({k: v for k, v in d.items() if k in ("sampler", "steps")}):
        warnings.warn(f"{name}: sdlearn_defaults {raw[:80]!r} has unusable entries; using SD v1.5's "
                      f"defaults for them", stacklevel=3)
    return out


def read_vocabulary(metadata: dict[str, str], name: str = "checkpoint") -> dict | None:
    """The words and grammar a model was trained on, from its `sdlearn_vocabulary` metadata
    (JSON {"words": [...], "grammar": [...]}), for models that know nothing else (the tiny one);
    None for a general model. A tiny model exported before that entry existed carries
    `sdlearn_training` instead: it was trained on `sdlearn.shapes`, whose words are used."""
    raw = metadata.get("sdlearn_vocabulary")
    if raw is None:
        if "sdlearn_training" not in metadata:
            return None
        from . import shapes
        return {"words": shapes.vocabulary(), "grammar": list(shapes.GRAMMAR)}
    try:
        d = json.loads(raw)
        if not (isinstance(d.get("words"), list) and isinstance(d.get("grammar"), list)
                and all(isinstance(w, str) for w in d["words"] + d["grammar"]) and d["grammar"]):
            raise ValueError("expected lists of strings under 'words' and 'grammar'")
    except (json.JSONDecodeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{name}: its sdlearn_vocabulary metadata is invalid ({exc})") from None
    return d


def resolve_source(source: str | os.PathLike) -> Path:
    """"tiny" → the bundled file; an existing path → itself; "owner/name" → a Hugging Face
    snapshot (cache first, honouring HF_HUB_OFFLINE)."""
    if str(source) == "tiny":
        if not TINY_PATH.exists():
            raise CheckpointError(f"the tiny model ({TINY_PATH.name}) is not in this installation of sdlearn; "
                                  "train and export it (see README, 'The tiny model') or set SDLEARN_WEIGHTS")
        return TINY_PATH
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and Path(text).suffix == ""
    if not looks_like_repo:
        raise CheckpointError(f"{source}: no such file or folder; expected \"tiny\", an SD v1.x .safetensors file, "
                              "a diffusers folder or a Hugging Face repo id such as owner/name")
    return hub_snapshot(text)


def hub_snapshot(repo_id: str, fp16: bool = False) -> Path:
    """Download (or find in the cache) only the files sdlearn needs from a diffusers-layout repo."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: looks like a Hugging Face repo id, but huggingface_hub is not "
                              "installed; `pip install huggingface_hub`, or pass a local file or folder") from None
    patterns = HUB_FILES + HUB_WEIGHTS["fp16" if fp16 else ""]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass   # not (completely) in the cache
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                              "download it once with network access or pass a local path")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointError(f"{repo_id}: could not be fetched from the Hugging Face hub "
                              f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})") from None


def load_pipeline(source: str | os.PathLike = "tiny", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, *, config: ModelConfig | None = None) -> Pipeline:
    """Load the tokenizer, text encoder, UNet, VAE and schedule from one source.

    device=None picks cuda, then mps, then cpu; dtype=None picks float16 on cuda, float32
    elsewhere. Each tensor is cast and moved as it is read; on the CPU in its stored dtype a
    weight stays a view of the memory-mapped file, so the weights are never held twice.
    """
    from .schedule import NoiseSchedule
    from .tokenizer import CLIPTokenizer, default_tokenizer

    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected a floating torch.dtype such as torch.float32 or torch.float16")
    ckpt = open_checkpoint(resolve_source(source), config)
    models = {c: load_component(ckpt, c, device, dtype) for c in COMPONENTS}
    tokenizer = CLIPTokenizer.from_folder(ckpt.tokenizer_folder) if ckpt.tokenizer_folder else default_tokenizer()
    return Pipeline(tokenizer=tokenizer, schedule=NoiseSchedule.scaled_linear(), device=device, dtype=dtype,
                    config=ckpt.config, source=str(source), defaults=read_defaults(ckpt.metadata, Path(ckpt.source).name),
                    vocabulary=read_vocabulary(ckpt.metadata, Path(ckpt.source).name),
                    **models)
