"""The capstone: your own functions, plugged into the package, draw the same picture.

    mine = exercises.load_saved()               # what check() saved from notebooks 03–06
    with exercises.use(mine, pipe):
        result = pipe.generate("a red circle", sampler="ddim", seed=0)

Inside the block the package calls your functions where it calls its own:

    name                    the package's place                       your function's signature
    timestep_embedding      UNet.forward's sinusoidal embedding       (timesteps (B,), dim) → (B, dim)
    attention               every UNet and VAE attention layer        (q, k, v, heads) → (B, N, C)
    group_norm              every nn.GroupNorm (UNet and VAE)         (x, num_groups, weight, bias, eps) → x
    resblock                every UNet ResBlock's forward             (block, x, t_emb) → (B, C_out, H, W)
    scaled_linear_betas     the pipeline's noise schedule             (T, beta_start, beta_end) → (T,)
    alphas_cumprod          ᾱ of that schedule                        (betas) → (T,)
    ddim_step               DDIMSampler.step, η = 0                   (x, eps, alpha_bar_t, alpha_bar_prev) → x_prev
    classifier_free_guidance  the pipeline's guidance                 (eps_uncond, eps_cond, scale) → eps
    sample_loop             the pipeline's loop                       (sampler, model, x, timesteps) → x

Pieces you leave out stay the package's. Everything is put back when the block ends, even
after an error. The CLIP text encoder's (causal) attention stays the package's: your
`attention` exercise has no mask.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
import torch.nn as nn

from .. import attention as attention_module
from .. import pipeline as pipeline_module
from .. import samplers as samplers_module
from .. import unet as unet_module
from .. import vae as vae_module
from ..schedule import NoiseSchedule
from .core import NotWrittenYet

PIECES = ("timestep_embedding", "attention", "group_norm", "resblock", "scaled_linear_betas",
          "alphas_cumprod", "ddim_step", "classifier_free_guidance", "sample_loop")


def missing(functions: dict[str, Callable]) -> list[str]:
    """The capstone pieces not in `functions`, in the order the notebooks teach them."""
    return [p for p in PIECES if p not in functions]


@contextmanager
def _patched(obj, attr: str, value):
    before = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, before)


def _attention(mine: Callable, package: Callable) -> Callable:
    def attention(q, k, v, heads, *, causal=False, tag=None):
        if causal:                                  # CLIP's masked attention: not an exercise
            return package(q, k, v, heads, causal=True, tag=tag)
        if tag is not None and attention_module._active:
            package(q, k, v, heads, tag=tag)         # the attention-map recorder still sees the layer
        return mine(q, k, v, heads)
    return attention


def _ddim_step(mine: Callable, package_step: Callable) -> Callable:
    def step(self, eps, t, x, generator=None):
        if self.eta != 0:
            return package_step(self, eps, t, x, generator)
        self._check_ready()
        t = int(t)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar_prev(prev_t)
        return samplers_module.StepOutput(mine(x, eps, a_t, a_prev), self._x0_hat(x, eps, a_t))
    return step


class _Stopped(Exception):
    def __init__(self, x):
        self.x = x


def _sample_loop(mine: Callable) -> Callable:
    """The pipeline's sample_loop, run by your loop. Your loop calls sampler.scale_input and
    sampler.step; the pipeline's hooks ride on those two calls: the step gets the pipeline's
    random generator, the inpainting blend and the callback (previews, progress bar, stopping
    early), so your four-line loop serves every feature of `generate`."""
    def sample_loop(sampler, model, x, timesteps, *, generator=None, blend=None, callback=None):
        state = {"i": 0, "x_in": None, "x0": None}
        plain_scale, plain_step = sampler.scale_input, sampler.step

        def scale_input(x, t):
            state["x_in"] = plain_scale(x, t)
            return state["x_in"]

        def step(eps, t, x, generator_unused=None, **unused):
            out = plain_step(eps, t, x, generator=generator)
            prev = out.prev_sample if blend is None else blend(state["i"], out.prev_sample)
            state["x0"] = out.pred_original_sample
            result = samplers_module.StepOutput(prev, out.pred_original_sample)
            stop = callback is not None and callback(state["i"], t, state["x_in"], result) is False
            state["i"] += 1
            if stop:
                raise _Stopped(prev)
            return result

        sampler.scale_input, sampler.step = scale_input, step        # on this sampler object only
        try:
            x = mine(sampler, model, x, timesteps)
            return samplers_module.LoopResult(x, state["x0"], state["i"])
        except _Stopped as stopped:
            return samplers_module.LoopResult(stopped.x, state["x0"], state["i"], stopped=state["i"] < len(timesteps))
        finally:
            del sampler.scale_input, sampler.step
    return sample_loop


def _schedule(functions: dict[str, Callable], old: NoiseSchedule) -> NoiseSchedule:
    """SD v1's schedule rebuilt from your betas and/or ᾱ (the pipeline's own must be that one)."""
    T = old.num_train_timesteps
    if not torch.allclose(old.betas, NoiseSchedule.scaled_linear(T).betas):
        raise ValueError(f"the capstone's schedule pieces build SD v1's scaled_linear schedule "
                         f"(0.00085 … 0.012); this pipeline's schedule is {old.name!r}")
    betas = functions["scaled_linear_betas"](T, 0.00085, 0.012) if "scaled_linear_betas" in functions else old.betas
    betas = torch.as_tensor(betas, dtype=torch.float32)
    abar = functions["alphas_cumprod"](betas) if "alphas_cumprod" in functions else None
    return NoiseSchedule(betas, name="scaled_linear", alphas_cumprod=abar)


@contextmanager
def use(functions: dict[str, Callable], pipe=None, *, require_all: bool = False):
    """Run the package with your functions in place of its own (see the module docstring).

    `pipe`: the Pipeline whose noise schedule your scaled_linear_betas / alphas_cumprod rebuild
    (needed only for those two). `require_all=True` refuses to start while a piece is missing
    and names the missing ones (NotWrittenYet)."""
    unknown = sorted(set(functions) - set(PIECES))
    if unknown:
        raise ValueError(f"use(): unknown piece(s) {unknown}; the pieces are {', '.join(PIECES)}")
    if require_all and missing(functions):
        raise NotWrittenYet("still to write for your own Stable Diffusion: " + ", ".join(missing(functions)))
    if ("scaled_linear_betas" in functions or "alphas_cumprod" in functions) and pipe is None:
        raise ValueError("use(): pass the pipeline, use(functions, pipe), to plug in your schedule pieces")
    with ExitStack() as stack:
        f = functions
        if "timestep_embedding" in f:
            stack.enter_context(_patched(unet_module, "timestep_embedding", f["timestep_embedding"]))
        if "attention" in f:
            for module in (unet_module, vae_module):
                stack.enter_context(_patched(module, "attention", _attention(f["attention"], attention_module.attention)))
        if "group_norm" in f:
            mine = f["group_norm"]
            stack.enter_context(_patched(nn.GroupNorm, "forward",
                                         lambda self, x: mine(x, self.num_groups, self.weight, self.bias, self.eps)))
        if "resblock" in f:
            mine_block = f["resblock"]
            stack.enter_context(_patched(unet_module.ResBlock, "forward", lambda self, x, t_emb: mine_block(self, x, t_emb)))
        if "ddim_step" in f:
            stack.enter_context(_patched(samplers_module.DDIMSampler, "step",
                                         _ddim_step(f["ddim_step"], samplers_module.DDIMSampler.step)))
        if "classifier_free_guidance" in f:
            stack.enter_context(_patched(pipeline_module, "classifier_free_guidance", f["classifier_free_guidance"]))
        if "sample_loop" in f:
            stack.enter_context(_patched(pipeline_module, "sample_loop", _sample_loop(f["sample_loop"])))
        if "scaled_linear_betas" in f or "alphas_cumprod" in f:
            stack.enter_context(_patched(pipe, "schedule", _schedule(f, pipe.schedule)))
        yield
