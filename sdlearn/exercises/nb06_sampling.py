"""Notebook 06 (sampling): classifier-free guidance, the sampling loop, img2img's timesteps."""
from __future__ import annotations

from functools import lru_cache

import torch

from .. import pipeline, samplers
from ..schedule import NoiseSchedule
from .core import Case, Exercise, Mistake, register

# ------------------------------------------------------------------ classifier-free guidance


def _guidance_cases() -> list[Case]:
    g = torch.Generator().manual_seed(6)
    u, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return [Case("ε_u, ε_c of shape (2, 4, 8, 8), scale 7.5", (u, c, 7.5)),
            Case("the same, scale 1 (the conditional prediction alone)", (u, c, 1.0)),
            Case("the same, scale 0 (the unconditional prediction alone)", (u, c, 0.0)),
            Case("ε_u, ε_c of shape (1, 4, 64, 64), scale 3", (torch.randn(1, 4, 64, 64, generator=g),
                                                               torch.randn(1, 4, 64, 64, generator=g), 3.0))]


register(Exercise(
    name="classifier_free_guidance", notebook="06_sampling", capstone=True,
    reference=pipeline.classifier_free_guidance,
    cases=_guidance_cases,
    mistakes=[Mistake("the guidance points the wrong way: it should move from ε_u towards ε_c and past it, "
                      "so at scale 2 the answer is further from ε_u than ε_c is, on ε_c's side.",
                      lambda u, c, g: u - g * (c - u)),
              Mistake("ε_u and ε_c are swapped: the unconditional prediction is the starting point, the "
                      "conditional one the direction to push towards (scale 0 must give ε_u).",
                      lambda u, c, g: c + g * (u - c)),
              Mistake("the scale multiplies ε_c alone; it should multiply the difference between the two "
                      "predictions (check your brackets: at scale 0 the answer must be ε_u).",
                      lambda u, c, g: u + g * c - u)],
    hint="try scale 1 and scale 0 by hand: they must give ε_c and ε_u exactly.",
    atol=1e-5, rtol=1e-5))


# --------------------------------------------------------------------------- the sampling loop

@lru_cache(maxsize=1)
def _tiny():
    """The bundled tiny model on the CPU (loaded once; the check always uses it, whatever the notebook runs)."""
    return pipeline.load_pipeline("tiny", device="cpu")


class _GuidedModel:
    """What `generate` hands its loop: the tiny model's guided ε-prediction, model(x_in, t), for one
    prompt. It remembers the prompt, guidance and seed, so the check can ask `pipe.generate` itself."""

    def __init__(self, prompt: str, guidance: float, seed: int):
        self.prompt, self.guidance, self.seed = prompt, guidance, seed
        pipe = _tiny()
        self._eps = pipe.eps_model(pipe.encode_prompts([prompt], [""]), guidance)

    def __call__(self, x_in: torch.Tensor, t) -> torch.Tensor:
        return self._eps(x_in, t)

    def __deepcopy__(self, memo):              # stateless: every check may share it
        return self

    def __repr__(self) -> str:
        return f"<the tiny model's guided ε-prediction for {self.prompt!r}, g = {self.guidance}>"


def _loop_case(sampler_name: str, steps: int, prompt: str, guidance: float, seed: int) -> Case:
    pipe = _tiny()
    sampler = samplers.get_sampler(sampler_name, pipe.schedule)
    sampler.set_timesteps(steps)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
    x = noise * sampler.init_noise_sigma
    return Case(f"the tiny model, {prompt!r}, sampler {sampler_name!r}, {steps} steps, guidance {guidance:g}, "
                f"seed {seed} (compared with pipe.generate's latents)",
                (sampler, _GuidedModel(prompt, guidance, seed), x, sampler.timesteps))


def _loop_cases() -> list[Case]:
    # Euler first: its x is kept in another scale than the UNet's input, so every planted
    # mistake shows there; DDIM is the capstone's sampler.
    return [_loop_case("euler", 4, "a large red circle on the left", 7.5, 0),
            _loop_case("ddim", 3, "a blue square at the top", 5.0, 1)]


def _generated(sampler, model, x, timesteps) -> torch.Tensor:
    """The very latents `pipe.generate` gives for the case's settings (its x and timesteps are
    the ones generate starts from)."""
    return _tiny().generate(model.prompt, guidance=model.guidance, sampler=sampler.name, steps=len(timesteps),
                            seed=model.seed, progress=False).latents


def _no_scale_input(sampler, model, x, timesteps):
    for t in timesteps:
        x = sampler.step(model(x, t), t, x).prev_sample
    return x


def _steps_x_in(sampler, model, x, timesteps):
    for t in timesteps:
        x_in = sampler.scale_input(x, t)
        x = sampler.step(model(x_in, t), t, x_in).prev_sample
    return x


def _x0_as_next(sampler, model, x, timesteps):
    for t in timesteps:
        x = sampler.step(model(sampler.scale_input(x, t), t), t, x).pred_original_sample
    return x


register(Exercise(
    name="sample_loop", notebook="06_sampling", capstone=True,
    reference=_generated,
    cases=_loop_cases,
    mistakes=[Mistake("the model gets x itself; it must get what scale_input makes of x. For Euler the "
                      "sampler keeps x in another scale than the noisy latents the UNet was trained on.",
                      _no_scale_input),
              Mistake("the step gets the scaled input; scale_input's result is only for the model. "
                      "sampler.step wants the sampler's own x, the one the loop carries.", _steps_x_in),
              Mistake("the loop carries the step's x̂₀ (pred_original_sample) to the next step; the next x "
                      "is the step's prev_sample, the sample at the next noise level.", _x0_as_next)],
    hint="trace one step by hand: what does the model get, what does the sampler's "
         "step get, and which field of the StepOutput becomes the next x?",
    atol=1e-4, rtol=1e-4))


# ------------------------------------------------------------------ image to image: the timesteps

def _strength_reference(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The package's own: a DDIM sampler's timesteps_for_strength (the cases' timesteps are DDIM's)."""
    sampler = samplers.DDIMSampler(NoiseSchedule.scaled_linear())
    visit = sampler.timesteps_for_strength(len(timesteps), strength)
    assert torch.equal(sampler.timesteps, timesteps), "the cases are DDIM's timesteps"
    return visit


def _strength_cases() -> list[Case]:
    def case(steps, strength):
        return Case(f"the {steps} DDIM timesteps ({', '.join(map(str, samplers.leading_timesteps(steps)[:3].tolist()))}, …), "
                    f"strength {strength}", (samplers.leading_timesteps(steps), strength))
    # Order matters for the hints: 10 × 0.25 = 2.5 tells flooring the skipped part from rounding.
    return [case(20, 0.6), case(10, 0.25), case(20, 0.33), case(50, 0.75), case(20, 1.0), case(50, 0.02)]


def _strength_inverted(timesteps, strength):
    n = len(timesteps)
    return timesteps[int(n * strength):]


def _strength_rounded(timesteps, strength):
    n = len(timesteps)
    return timesteps[n - round(n * strength):]


def _skipped_floored(timesteps, strength):
    n = len(timesteps)
    return timesteps[int(n * (1 - strength)):]


register(Exercise(
    name="img2img_timesteps", notebook="06_sampling",
    reference=_strength_reference,
    cases=_strength_cases,
    mistakes=[Mistake("strength is the fraction of the steps that RUN (strength 1: all of them, from pure "
                      "noise), not the fraction skipped.", _strength_inverted),
              Mistake("the number of steps to run is rounded down (int), as diffusers does, not to the "
                      "nearest whole number: 20 steps at strength 0.33 run 6.", _strength_rounded),
              Mistake("round down the number of steps that run, not the number skipped: 10 steps at "
                      "strength 0.25 run int(2.5) = 2 steps, so 8 are skipped.", _skipped_floored)],
    hint="work out by hand how many of the 20 steps run at strength 0.6, and which ones: the first or the last?",
    atol=0, rtol=0))
