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
refused when loading (sdlearn/layouts.py); a standard model with `mask=` inpaints as above.

Defaults (`sdlearn.sources.read_defaults`): the noise schedule and the sampler come from a
diffusers folder's scheduler config, or the `sampler` and `steps` from the `sdlearn_defaults`
metadata the tiny model's export writes; otherwise those of the SD v1.5 repo (PNDM, 50 steps,
scaled_linear betas, as diffusers runs it). `guidance` is 7.5; the size is the model's native one
(UNet sample_size × the VAE's factor 8: 512×512 for SD v1.5, 64×64 for the tiny model).
"""
from __future__ import annotations

import os
import re
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import fast_cpu, lora, textual_inversion
from .attention_maps import CrossAttentionMaps, word_maps
from .configs import ModelConfig
from .device import auto_dtype, choose_threads, cpu_generator, default_dtype, randn, resolve_device, using_threads
from .images import to_pil
from .preview import LatentPreview, fitting_images
from .prompt_syntax import check_syntax
from .request import check_embeds, make_request, per_image
from .samplers import get_sampler, sample_loop
from .tokenizer import CLIPTokenizer, default_tokenizer
from .unet import flops_per_call
from .weighted_text import encode_weighted, pad_with_empty
from .checkpoint import COMPONENTS, load_component, open_checkpoint
from .sources import SD15_DEFAULTS, read_defaults, read_preview, read_vocabulary, resolve_source

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
    defaults: dict = field(default_factory=dict)   # {"sampler", "steps", "steps_offset"}: the checkpoint's, if any
    vocabulary: dict | None = None     # {"words", "grammar"} for a model trained on a closed grammar (tiny)
    _preview: object = field(default=None, init=False, repr=False)
    _warned: set = field(default_factory=set, init=False, repr=False)

    def __repr__(self) -> str:
        params = {c: sum(p.numel() for p in getattr(self, c).parameters()) / 1e6 for c in COMPONENTS}
        sizes = ", ".join(f"{c} {n:.1f}M" for c, n in params.items())
        added = [x for x in (lora.summary(self), textual_inversion.summary(self.tokenizer)) if x]   # "; LoRA …; tokens …"
        return f"Pipeline({self.source!r}, {self.device}, {str(self.dtype).replace('torch.', '')}; {'; '.join([sizes, *added])})"

    # -- sizes and defaults -------------------------------------------------------------------

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype of the sampler's x between steps: the models' dtype, except float32 for
        bfloat16 models. bfloat16 keeps 8 bits of mantissa (relative steps of 2⁻⁸ = 0.4 %), too
        coarse to carry x through the sampler's updates x ← a·x + b·ε; the UNet gets x cast to
        bfloat16 and gives back ε cast to float32. (float16 keeps 11 bits, as diffusers runs it.)"""
        return torch.float32 if self.dtype == torch.bfloat16 else self.dtype

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
        texts = [textual_inversion.without_added_tokens(self.tokenizer, t) for t in texts]   # learned words are known
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
    def latent_preview(self) -> LatentPreview:
        """The latents → RGB preview: the one stored in the checkpoint (the tiny model's), else
        one fitted on this pipeline's VAE the first time it is asked for (then cached)."""
        if self._preview is None:
            with torch.inference_mode():
                self._preview = LatentPreview.fit(self.vae, fitting_images().to(self.device, self.dtype))
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
        return choose_threads(flops_per_call(self.unet.config) if self.device.type == "cpu" else None)

    # -- LoRA (sdlearn/lora.py) ---------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> "lora.Loaded":
        """Fuse a kohya or diffusers/PEFT LoRA file into the UNet and text encoder:
        W ← W + scale·(α/r)·up@down. Several add up; `unload_lora` restores the weights exactly."""
        return lora.load(self, path, scale)

    def unload_lora(self) -> int:
        """Remove every loaded LoRA (the original weights back, bit for bit); returns the layer count."""
        return lora.unload(self)

    # -- text → image -------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None = None,
                       prompt_syntax: str | None = None) -> torch.Tensor:
        """CLIP's last hidden states: (B, 77, width), or (2B, 77, width) for [negatives, prompts].
        prompt_syntax: None (plain text), "compel" or "a1111" (sdlearn.weighted_text): weights,
        and prompts longer than 75 tokens in chunks, (B, 77·chunks, width)."""
        texts = prompts if negatives is None else list(negatives) + list(prompts)
        if check_syntax(prompt_syntax) is not None:       # multi-vector tokens expanded after parsing
            return encode_weighted(self.tokenizer, self.text_encoder, texts, prompt_syntax)
        texts = [textual_inversion.expand_prompt(self.tokenizer, t) for t in texts]   # multi-vector tokens
        return self.text_encoder(self.tokenizer(texts).to(self.device))

    def load_textual_inversion(self, path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (web-UI .pt/.safetensors or diffusers learned_embeds)
        as a new token; returns the tokens added (sdlearn/textual_inversion.py)."""
        return textual_inversion.load(self, path, token)

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> None:
        """Remove added tokens (default: all) and their embedding rows."""
        textual_inversion.unload(self, tokens)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents (B, 4, h, w) → pixels (B, 3, 8h, 8w) in [0, 1], float32 on the CPU."""
        images = self.vae.decode(latents.to(self.device, self.dtype) / self.vae.scaling_factor)
        return (images / 2 + 0.5).clamp(0, 1).float().cpu()

    def generate(self, prompt: str | list[str] | None = None, *, negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, guidance: float = 7.5, sampler: str | None = None,
                 seed: int | None = None, latents: torch.Tensor | None = None, height: int | None = None,
                 width: int | None = None, eta: float = 0.0, callback: Callable | None = None, image=None,
                 strength: float = 0.8, mask=None, num_images: int = 1, karras: bool = False,
                 steps_offset: int | None = None, attention_maps: bool = False,
                 progress: bool = True, prompt_syntax: str | None = None,
                 prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None) -> GenerationResult:
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
        prompt_syntax    None: plain text (parentheses are text, as in diffusers); "compel": the
                         compel library's word+, (words)1.3, .blend(), .and(); "a1111": the web
                         UI's (word:1.3), (word), [word], BREAK. Both take prompts longer than 75
                         tokens in chunks (sdlearn.prompt_syntax, sdlearn.weighted_text)
        prompt_embeds    instead of prompt: the conditioning itself, (B, tokens, width) as
                         `pipe.encode_prompts` returns it (e.g. two prompts' interpolated,
                         sdlearn.interpolation); negative_prompt_embeds likewise for the
                         unconditional half (default: negative_prompt encoded)

        It runs on `pipe.cpu_threads` CPU threads (one for the tiny model; $SDLEARN_THREADS or a
        count set with torch.set_num_threads takes precedence) and restores torch's count after.
        """
        threads = self.cpu_threads
        check_syntax(prompt_syntax)
        if attention_maps and (prompt_syntax is not None or prompt_embeds is not None):
            raise ValueError("attention_maps=True names the words of a plain text prompt; use it without "
                             "prompt_syntax and without prompt_embeds")
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            prompt = check_embeds(self, prompt, prompt_embeds, negative_prompt_embeds)
        with torch.inference_mode(), using_threads(threads):
            req = make_request(self, prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                               sampler=sampler, seed=seed, latents=latents, height=height, width=width, eta=eta,
                               callback=callback, image=image, strength=strength, mask=mask,
                               num_images=num_images, karras=karras, steps_offset=steps_offset,
                               prompt_syntax=prompt_syntax)
            generator = cpu_generator(req.seed)
            sched = get_sampler(req.sampler, self.schedule, **req.sampler_options)
            if prompt_embeds is None:
                context = self.encode_prompts(req.prompts, req.negatives if req.guided else None, prompt_syntax)
            else:
                context = self._given_context(req, prompt_embeds, negative_prompt_embeds, prompt_syntax)
            start = self._start(req, sched, generator)
            recorder = nullcontext()
            if attention_maps:
                rows = slice(req.batch, 2 * req.batch) if req.guided else slice(0, req.batch)
                recorder = CrossAttentionMaps(rows=rows, latent_size=req.latent_shape[2:])
            bar = tqdm(total=len(start.timesteps), desc=req.sampler, disable=not progress, leave=False)

            def on_step(i, t, x_in, out):
                bar.update()
                info = StepInfo(i, len(start.timesteps), t.item(), out.prev_sample, out.pred_original_sample, self)
                return callback is None or not _asks_to_stop(callback, info)

            run = sample_loop(sched, self.eps_model(context, req.guidance, recorder), start.x, start.timesteps,
                              generator=generator, blend=start.blend(sched), callback=on_step)
            bar.close()
            pixels = self.decode(run.x0_hat if run.stopped else run.x)
            maps = None
            if attention_maps:
                tokens = recorder.token_maps((req.height, req.width))
                maps = [word_maps(self.tokenizer, p, tokens[b]) for b, p in enumerate(req.prompts)]
        return GenerationResult(images=to_pil(pixels), pixels=pixels, latents=run.x, seed=req.seed,
                                settings={**req.settings(), "prompt_syntax": prompt_syntax,
                                          "prompt_embeds": prompt_embeds is not None, "source": self.source,
                                          "cpu_threads": threads}, steps_done=run.steps,
                                stopped_early=run.stopped, attention_maps=maps)

    def _given_context(self, req, cond: torch.Tensor, uncond: torch.Tensor | None, prompt_syntax) -> torch.Tensor:
        """`prompt_embeds` (and `negative_prompt_embeds`) as the context `eps_model` takes: each row
        repeated per image, [unconditional; conditional] when guided, padded to one length with
        empty-prompt chunks (as long weighted prompts are)."""
        cond = cond.to(self.device, self.dtype).repeat_interleave(req.num_images, dim=0)
        if not req.guided:
            return cond
        if uncond is None:
            uncond = self.encode_prompts(req.negatives, None, prompt_syntax)
        else:
            uncond = uncond.to(self.device, self.dtype).expand(len(cond) // req.num_images, -1, -1)
            uncond = uncond.repeat_interleave(req.num_images, dim=0)
        if uncond.shape[1] != cond.shape[1]:
            uncond, cond = pad_with_empty([uncond, cond], self.encode_prompts([""]))
        return torch.cat([uncond, cond])

    def eps_model(self, context: torch.Tensor, guidance: float, recorder=nullcontext()) -> Callable:
        """The ε-prediction the sampling loop calls, model(x_in, t): the UNet on `context`, with
        classifier-free guidance when g > 1 — then `context` is [unconditional; conditional] and
        both halves run as one batch. `recorder` (an AttentionRecorder) sees every UNet call."""
        def model(x_in: torch.Tensor, t) -> torch.Tensor:
            with recorder:
                if guidance <= 1:
                    return self.unet(x_in.to(self.dtype), t, context).to(x_in.dtype)
                eps = self.unet(torch.cat([x_in, x_in]).to(self.dtype), t, context).to(x_in.dtype)
            return classifier_free_guidance(*eps.chunk(2), guidance)
        return model

    def _start(self, req, sched, generator) -> "_Start":
        """The timesteps to visit and the starting x.

        text → image:  x = ε · σ_init over all the steps
        image → image: z ~ q(z | image) (the generator's first numbers), x = add_noise(z·s, ε, t₀)
                       over the last `strength` of the steps (diffusers' img2img)
        inpainting:    as image → image, but pure noise at strength 1 (diffusers' 4-channel inpainting)
        """
        def unit_noise():
            if req.latents is not None:
                return req.latents.to(self.device)
            return randn(req.latent_shape, generator, dtype=self.latent_dtype, device=self.device)

        if req.image is None:
            sched.set_timesteps(req.steps)
            noise = unit_noise()
            return _Start(sched.timesteps, noise * sched.init_noise_sigma, noise)

        timesteps = sched.timesteps_for_strength(req.steps, req.strength)
        # Each picture is encoded once (as diffusers does), then repeated per image.
        z_first = self.vae.encode(req.image.to(self.device, self.dtype)).sample(generator) * self.vae.scaling_factor
        z_first = z_first.to(self.latent_dtype)
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
            randn(z_first.shape, generator, dtype=z_first.dtype, device=z_first.device)
            mask = torch.nn.functional.interpolate(req.mask, size=req.latent_shape[2:])   # nearest, as diffusers
            mask = mask.to(self.device, self.latent_dtype)
        return _Start(timesteps, x, noise, z_image, mask)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̂ = ε_u + g · (ε_c − ε_u)   (Ho & Salimans 2022): g = 1 is the conditional prediction, g = 0
    the unconditional one, g > 1 pushes past the conditional one, away from the unconditional."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@dataclass
class _Start:
    timesteps: torch.Tensor
    x: torch.Tensor                         # the sampler's starting x
    noise: torch.Tensor                     # the unit noise ε in it
    z_image: torch.Tensor | None = None     # the picture's latents (img2img, inpainting)
    mask: torch.Tensor | None = None        # latent-size mask, 1 = repaint (inpainting)

    def blend(self, sched) -> Callable | None:
        """Inpainting's hook for the loop: after step i, keep the known region (mask = 0) of the
        picture's latents noised to the next step's level (diffusers' 4-channel inpainting):
            x ← (1 − m) · add_noise(z_image, ε, t_{i+1}) + m · x        (at the last step: z_image)"""
        if self.mask is None:
            return None
        n = len(self.timesteps)

        def blend(i: int, x: torch.Tensor) -> torch.Tensor:
            known = self.z_image if i == n - 1 else sched.add_noise(self.z_image, self.noise, self.timesteps[i + 1:i + 2])
            return (1 - self.mask) * known + self.mask * x
        return blend


def _asks_to_stop(callback, info: StepInfo) -> bool:
    try:
        return callback(info) is False
    except StopGeneration:
        return True


def load_pipeline(source: str | os.PathLike = "tiny", device: str | torch.device | None = None,
                  dtype: torch.dtype | str | None = None, *, config: ModelConfig | None = None,
                  fast: bool = True) -> Pipeline:
    """Load the tokenizer, text encoder, UNet, VAE and schedule from one source.

    device=None picks cuda, then mps, then cpu; dtype=None picks float16 on cuda, float32
    elsewhere; dtype="auto" also picks bfloat16 on a CPU that multiplies it natively (AMX-BF16,
    AVX512_BF16: sdlearn.device.auto_dtype), faster and a few pixel levels away from float32.
    Each tensor is cast and moved as it is read; on the CPU in its stored dtype a
    weight stays a view of the memory-mapped file, so the weights are never held twice.
    fast=True (on a CPU) swaps the UNet's layers for `sdlearn.fast_cpu`'s faster ones and runs the
    VAE's decoder on channels-last maps: same weights, same results to float32 rounding; fast=False keeps
    the plain PyTorch layers and memory format.
    """
    device = resolve_device(device)
    dtype = auto_dtype(device) if dtype == "auto" else dtype or default_dtype(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected a floating torch.dtype such as torch.float32 or torch.bfloat16, "
                         "or \"auto\"")
    ckpt = open_checkpoint(resolve_source(source), config)
    models = {c: load_component(ckpt, c, device, dtype) for c in COMPONENTS}
    if fast and device.type == "cpu":
        fast_cpu.enable(models["unet"], fast_cpu.choose_paths())
        fast_cpu.enable(models["vae"], fast_cpu.choose_paths())
    tokenizer = CLIPTokenizer.from_folder(ckpt.tokenizer_folder) if ckpt.tokenizer_folder else default_tokenizer()
    defaults = read_defaults(ckpt)
    pipe = Pipeline(tokenizer=tokenizer, schedule=defaults.schedule, device=device, dtype=dtype,
                    config=ckpt.config, source=str(source), defaults=defaults.generate,
                    vocabulary=read_vocabulary(ckpt.metadata, Path(ckpt.source).name), **models)
    pipe._preview = read_preview(ckpt.metadata, Path(ckpt.source).name)
    return pipe
