"""Samplers: the reverse process, x_T → x_0, one model call per step.

Every sampler is a small state machine that holds no model:

    sampler = get_sampler("ddim", NoiseSchedule.scaled_linear())
    sampler.set_timesteps(50)                       # sampler.timesteps: 981, 961, …, 1
    x = noise * sampler.init_noise_sigma
    for t in sampler.timesteps:
        eps = unet(sampler.scale_input(x, t), t, context)
        x = sampler.step(eps, t, x, generator=g).prev_sample

Names and behaviour follow diffusers' schedulers built from the SD v1.5 scheduler config
(scaled_linear betas, "leading" timesteps, `steps_offset=1`, `set_alpha_to_one=False`,
`skip_prk_steps=True`, ε-prediction), step for step: same timesteps, same latents, and the
stochastic ones draw their noise in the same order, shape, dtype and device, so a seeded
`torch.Generator` gives the same result.

    "ddpm"      DDPMSampler             ancestral sampling, Ho et al. 2020
    "ddim"      DDIMSampler(eta=0)      Song et al. 2021; η = 1 is DDPM-like
    "pndm"      PNDMSampler             PLMS (Liu et al. 2022) with the PRK warm-up skipped
    "euler"     EulerSampler            Karras et al. 2022, Algorithm 2 without churn
    "euler_a"   EulerAncestralSampler   k-diffusion's `sample_euler_ancestral`
    "dpmpp_2m"  DPMSolverPP2MSampler    DPM-Solver++(2M), Lu et al. 2022

The σ-based ones (euler, euler_a, dpmpp_2m) take `karras=True` for Karras et al.'s spacing
σ_i = (σ_max^(1/ρ) + i/(N−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7.

Notation: ᾱ_t = schedule.alphas_cumprod[t]; σ_t = √((1−ᾱ_t)/ᾱ_t); t' is the next (smaller)
timestep of the chain; x̂₀ the model's current estimate of the clean sample.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .device import randn
from .schedule import NoiseSchedule


@dataclass
class StepOutput:
    prev_sample: torch.Tensor            # x_{t'}: the sample for the next step
    pred_original_sample: torch.Tensor   # x̂₀ predicted from this step's (x_t, t, ε)


def leading_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1,
                      num_points: int | None = None) -> torch.Tensor:
    """diffusers' "leading" spacing: (k · ⌊T / num_points⌋ + steps_offset) for k = num_points−1 … 0,
    the first `num_steps` of them. SD v1.5, 50 steps: 981, 961, …, 21, 1."""
    num_points = num_points or num_steps
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}; got {num_steps}")
    ratio = num_train_timesteps // num_points
    t = (torch.arange(num_points - 1, -1, -1) * ratio + steps_offset)[:num_steps]
    if t[0] >= num_train_timesteps:
        raise ValueError(f"{num_steps} steps with steps_offset={steps_offset} would start at timestep "
                         f"{t[0].item()}, beyond the trained range 0…{num_train_timesteps - 1}; "
                         f"use at most {num_train_timesteps - steps_offset} steps, or steps_offset=0 "
                         f"(generate(..., steps_offset=0); on the command line --steps-offset 0)")
    return t


class Sampler:
    """The interface every sampler shares. ᾱ-based (VP) samplers use it as is."""
    name = ""
    stochastic = False

    def __init__(self, schedule: NoiseSchedule | None = None, *, steps_offset: int = 1):
        self.schedule = schedule if schedule is not None else NoiseSchedule.scaled_linear()
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.steps_offset = steps_offset
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self.begin_index: int | None = None
        self.init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps for a run of `num_inference_steps` steps and forget any history."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = leading_timesteps(num_inference_steps, self.num_train_timesteps, self.steps_offset)
        self.begin_index = None

    def timesteps_for_strength(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """img2img: set up `num_inference_steps` steps, then skip the first (1 − strength) of them,
        as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps does. Returns the timesteps to
        visit; noise the clean latents with `add_noise(x0, noise, timesteps[:1])` first."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1]; got {strength}")
        self.set_timesteps(num_inference_steps)
        t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        if t_start >= len(self.timesteps):
            raise ValueError(f"strength={strength} with {num_inference_steps} steps leaves no step to run "
                             f"(int(steps × strength) = 0); raise strength or steps")
        self.begin_index = t_start
        return self.timesteps[t_start:]

    def scale_input(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """What the model should see at timestep t: x itself for the ᾱ-based samplers."""
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Noise clean samples to timestep t in this sampler's space: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε."""
        return self.schedule.q_sample(x0, t, noise)

    def step(self, eps: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        raise NotImplementedError

    def _check_ready(self) -> None:
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(n) before step()")

    def _alpha_bar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t]

    def _alpha_bar_prev(self, prev_t: int) -> torch.Tensor:
        """ᾱ_{t'}; past the end of the chain ᾱ_0, not 1 (SD v1.5's `set_alpha_to_one=False`)."""
        return self.alphas_cumprod[prev_t] if prev_t >= 0 else self.alphas_cumprod[0]

    def _x0_hat(self, x: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
        """x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t     (DDPM eq. 15, DDIM eq. 12)"""
        return (x - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5

    def __repr__(self) -> str:
        n = self.num_inference_steps
        return f"{type(self).__name__}(schedule={self.schedule.name}, steps={n})"


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020, eq. 7 and 15), on a strided chain t → t':

        x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
        β'_t = 1 − ᾱ_t / ᾱ_{t'}                                 (the β of the whole jump)
        μ̃ = √ᾱ_{t'} β'_t / (1−ᾱ_t) · x̂₀ + √(1−β'_t) (1−ᾱ_{t'}) / (1−ᾱ_t) · x_t
        σ² = β̃ = (1−ᾱ_{t'}) / (1−ᾱ_t) · β'_t                    ("fixed_small" variance)
        x_{t'} = μ̃ + σ z,   z ~ N(0, I) drawn whenever t > 0

    t' is the next timestep in `timesteps`; after the last one ᾱ_{t'} = 1.
    """
    name = "ddpm"
    stochastic = True

    def _prev_timestep(self, t: int) -> int:
        i = (self.timesteps == t).nonzero()[0, 0].item()
        return self.timesteps[i + 1].item() if i + 1 < len(self.timesteps) else -1

    def step(self, eps, t, x, generator=None):
        self._check_ready()
        t = int(t)
        prev_t = self._prev_timestep(t)
        a_t = self._alpha_bar(t)
        a_prev = self._alpha_bar(prev_t) if prev_t >= 0 else torch.tensor(1.0)
        beta_t = 1 - a_t / a_prev

        x0_hat = self._x0_hat(x, eps, a_t)
        mean = (a_prev ** 0.5 * beta_t) / (1 - a_t) * x0_hat + (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t) * x
        if t > 0:
            variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
            mean = mean + variance ** 0.5 * randn(eps.shape, generator, dtype=eps.dtype, device=eps.device)
        return StepOutput(mean, x0_hat)


class DDIMSampler(Sampler):
    """Denoising diffusion implicit models (Song et al. 2021, eq. 12 and 16):

        x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
        σ_t = η · √((1−ᾱ_{t'}) / (1−ᾱ_t)) · √(1 − ᾱ_t/ᾱ_{t'})
        x_{t'} = √ᾱ_{t'} x̂₀  +  √(1 − ᾱ_{t'} − σ_t²) ε  +  σ_t z

    t' = t − T/N; past the end ᾱ_{t'} = ᾱ_0 (SD's `set_alpha_to_one=False`, so the last step
    lands on x at timestep 0, not on x̂₀). η = 0: deterministic; η = 1: DDPM's variance.
    """
    name = "ddim"

    def __init__(self, schedule=None, *, eta: float = 0.0, steps_offset: int = 1):
        super().__init__(schedule, steps_offset=steps_offset)
        self.eta = eta
        self.stochastic = eta > 0

    def step(self, eps, t, x, generator=None):
        self._check_ready()
        t = int(t)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar_prev(prev_t)

        x0_hat = self._x0_hat(x, eps, a_t)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev ** 0.5 * x0_hat + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + sigma * randn(eps.shape, generator, dtype=eps.dtype, device=eps.device)
        return StepOutput(x_prev, x0_hat)


class PNDMSampler(Sampler):
    """Pseudo linear multi-step (PLMS; Liu et al. 2022, eq. 9 and 12) with the Runge–Kutta
    warm-up skipped, as SD uses it. The transfer from t to t' for a given ε is

        φ(x_t, ε) = √(ᾱ_{t'}/ᾱ_t) x_t − (ᾱ_{t'} − ᾱ_t) / (ᾱ_t √(1−ᾱ_{t'}) + √(ᾱ_t (1−ᾱ_t) ᾱ_{t'})) · ε

    (the same deterministic map as DDIM η=0), and ε is replaced by an Adams–Bashforth mix of
    the latest model outputs e_1 (newest) … e_4:

        step 1        e_1                             (remember x_t)
        step 2        (e_1 + e_0) / 2, from the remembered x_t again   (a Heun-like restart;
                                                         this is why the 2nd timestep repeats)
        then          (3e_1 − e_2) / 2
                      (23e_1 − 16e_2 + 5e_3) / 12
                      (55e_1 − 59e_2 + 37e_3 − 9e_4) / 24

    20 steps visit 951, 901, 901, 851, …, 1: 21 model calls.
    """
    name = "pndm"

    def set_timesteps(self, num_inference_steps):
        super().set_timesteps(num_inference_steps)
        t = self.timesteps
        self.timesteps = torch.cat([t[:1], t[1:2], t[1:]])   # repeat the second timestep
        self.ets: list[torch.Tensor] = []                    # past model outputs, oldest first
        self.counter = 0
        self.cur_sample: torch.Tensor | None = None

    def step(self, eps, t, x, generator=None):
        self._check_ready()
        t = int(t)
        x0_hat = self._x0_hat(x, eps, self._alpha_bar(t))
        stride = self.num_train_timesteps // self.num_inference_steps
        prev_t = t - stride
        if self.counter != 1:
            self.ets = self.ets[-3:] + [eps]
        else:                            # the repeated timestep: redo the first jump, t+stride → t
            prev_t, t = t, t + stride

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            e = eps
            self.cur_sample = x
        elif len(ets) == 1 and self.counter == 1:
            e = (eps + ets[-1]) / 2
            x, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])

        self.counter += 1
        return StepOutput(self._transfer(x, e, t, prev_t), x0_hat)

    def _transfer(self, x, eps, t, prev_t):
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar_prev(prev_t)
        x_coeff = (a_prev / a_t) ** 0.5
        eps_denominator = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return x_coeff * x - (a_prev - a_t) * eps / eps_denominator


class SigmaSampler(Sampler):
    """Shared by the samplers that work in σ = √((1−ᾱ)/ᾱ) rather than in ᾱ.

    They index a table `sigmas` (one σ per step, then a final 0) by a step counter, as
    diffusers does: the counter starts at `begin_index` (img2img) or at the position of the first
    timestep seen, and moves on by one per `step`.
    """
    karras_rho = 7.0

    def __init__(self, schedule=None, *, karras: bool = False, steps_offset: int = 1):
        super().__init__(schedule, steps_offset=steps_offset)
        self.karras = karras
        self.sigmas: torch.Tensor | None = None
        self.step_index: int | None = None

    # -- the σ table ---------------------------------------------------------------------

    def _karras_sigmas(self, sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
        """σ_i = (σ_max^(1/ρ) + i/(n−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ   (Karras et al. 2022, eq. 5)

        Computed in float64 with NumPy, operation for operation as diffusers' `_convert_to_karras`,
        so the table is the same to the last bit on every CPU (see `_sigma_to_t`)."""
        rho = self.karras_rho
        ramp = np.linspace(0, 1, n)
        max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        return torch.from_numpy((max_inv + ramp * (min_inv - max_inv)) ** rho)

    def _sigma_to_t(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep at which the schedule has noise level σ: linear in log σ
        between the two table entries around it.  (n,) float64 → (n,) float64

        Why NumPy here: the last bit of a float32 logarithm is not fixed by IEEE 754. PyTorch's
        `log` goes to Intel's MKL on Intel CPUs and to its own vector code elsewhere, NumPy has
        its own; they can disagree by one ulp, and a Karras timestep then moves by one float32
        ulp (597.1300 vs 597.1301). diffusers computes this step with NumPy, so sdlearn does the
        very same operations in the same dtypes (log σ of the table in float32, of σ in float64,
        the table gap lo − hi in float32) and its timesteps equal diffusers' on any CPU."""
        log_sigmas = np.log(self.schedule.sigmas.numpy())                 # float32, increasing in t
        t = []
        for sigma in sigmas.numpy():
            log_sigma = np.log(np.maximum(sigma, 1e-10))                  # float64
            low = min(max(int(np.count_nonzero(log_sigmas <= log_sigma)) - 1, 0), len(log_sigmas) - 2)
            lo, hi = log_sigmas[low], log_sigmas[low + 1]
            w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
            t.append((1 - w) * low + w * (low + 1))
        return torch.from_numpy(np.array(t, dtype=np.float64))

    def _finish_table(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        self.timesteps = timesteps
        self.sigmas = torch.cat([sigmas.double(), torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
        self.step_index = None
        self.begin_index = None

    # -- the step counter ----------------------------------------------------------------

    def _index_for_timestep(self, t) -> int:
        """Position of t in `timesteps` (the second one if it occurs twice, the last if never)."""
        hits = (self.timesteps == torch.as_tensor(t, dtype=self.timesteps.dtype)).nonzero()
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return hits[1 if len(hits) > 1 else 0].item()

    def _sigma_now(self, t) -> torch.Tensor:
        self._check_ready()
        if self.step_index is None:
            self.step_index = self.begin_index if self.begin_index is not None else self._index_for_timestep(t)
        return self.sigmas[self.step_index]

    def _add_noise_index(self, t) -> list[int]:
        t = torch.as_tensor(t).reshape(-1)
        if self.begin_index is None:
            return [self._index_for_timestep(ti) for ti in t]
        return [self.step_index if self.step_index is not None else self.begin_index] * len(t)


class EulerSampler(SigmaSampler):
    """Euler's method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 2, no churn).

    The sampler's x is x_t / √ᾱ_t = x_0 + σ ε (variance-exploding form), so

        model input  x / √(σ_i² + 1)                    (= the x_t the UNet was trained on)
        x̂₀ = x − σ_i ε
        d = (x − x̂₀) / σ_i                              (dx/dσ, which is ε)
        x_{i+1} = x + (σ_{i+1} − σ_i) · d               (σ_N = 0)

    Starting noise is scaled by √(σ_max² + 1). Timesteps are float32 like diffusers'; with
    `karras=True` they fall between integers (σ ↦ t by interpolating log σ), and the Karras range
    is [σ(last timestep), σ(first timestep)] of the leading spacing.
    """
    name = "euler"

    def set_timesteps(self, num_inference_steps):
        self.num_inference_steps = num_inference_steps
        t = leading_timesteps(num_inference_steps, self.num_train_timesteps, self.steps_offset)
        sigmas = self.schedule.sigmas[t].double()
        if self.karras:
            sigmas = self._karras_sigmas(sigmas[0].item(), sigmas[-1].item(), num_inference_steps)
            t = self._sigma_to_t(sigmas)
        self._finish_table(t.to(torch.float32), sigmas)
        self.init_noise_sigma = ((self.sigmas.max() ** 2 + 1) ** 0.5).item()

    def scale_input(self, x, t):
        sigma = self._sigma_now(t)
        return x / ((sigma ** 2 + 1) ** 0.5)

    def add_noise(self, x0, noise, t):
        """x = x_0 + σ ε (this sampler's scaled space)."""
        sigma = self.sigmas.to(x0.device, x0.dtype)[self._add_noise_index(t)]
        return x0 + noise * sigma.reshape((-1,) + (1,) * (x0.ndim - 1))

    def step(self, eps, t, x, generator=None):
        sigma = self._sigma_now(t)
        sigma_next = self.sigmas[self.step_index + 1]
        x = x.to(torch.float32)
        x0_hat = x - sigma * eps
        d = (x - x0_hat) / sigma
        x_next = x + d * (sigma_next - sigma)
        self.step_index += 1
        return StepOutput(x_next.to(eps.dtype), x0_hat)


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral (k-diffusion's `sample_euler_ancestral`): an Euler step down to σ_down,
    then fresh noise back up to σ_{i+1}:

        σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²),    σ_down = √(σ_{i+1}² − σ_up²)
        x̂₀ = x − σ_i ε,    d = (x − x̂₀) / σ_i
        x_{i+1} = x + (σ_down − σ_i) · d + σ_up · z,     z ~ N(0, I)   (drawn every step)

    diffusers' EulerAncestralDiscreteScheduler has no Karras option; `karras=True` here uses
    the same σ table as `EulerSampler(karras=True)`.
    """
    name = "euler_a"
    stochastic = True

    def step(self, eps, t, x, generator=None):
        sigma = self._sigma_now(t)
        sigma_next = self.sigmas[self.step_index + 1]
        x = x.to(torch.float32)
        x0_hat = x - sigma * eps
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        d = (x - x0_hat) / sigma
        x_next = x + d * (sigma_down - sigma)
        x_next = x_next + randn(eps.shape, generator, dtype=eps.dtype, device=eps.device) * sigma_up
        self.step_index += 1
        return StepOutput(x_next.to(eps.dtype), x0_hat)


class DPMSolverPP2MSampler(SigmaSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep solver of the
    probability-flow ODE in λ = log(α/σ), using the data prediction x̂₀.

    Works on the ordinary x_t (variance-preserving): for σ_i of the table,
        α_i = 1 / √(σ_i² + 1),   s_i = σ_i α_i,   λ_i = log α_i − log s_i,   h_i = λ_{i+1} − λ_i

        x̂₀_i = (x_i − s_i ε) / α_i
        D_i = x̂₀_i                                            (first and last step: DPM-Solver++(1),
                                                               i.e. DDIM)
        D_i = (1 + 1/(2r_i)) x̂₀_i − 1/(2r_i) x̂₀_{i−1},  r_i = h_{i−1}/h_i     (otherwise)
        x_{i+1} = (s_{i+1}/s_i) x_i − α_{i+1} (e^{−h_i} − 1) D_i

    Timesteps are "leading" over N+1 points with the last dropped (50 steps: 951, 932, …, 20),
    as diffusers' DPMSolverMultistepScheduler does; the final σ is 0. With `karras=True` the
    Karras range is the whole schedule [σ(0), σ(T−1)] and timesteps are rounded to integers.
    """
    name = "dpmpp_2m"

    def set_timesteps(self, num_inference_steps):
        self.num_inference_steps = num_inference_steps
        t = leading_timesteps(num_inference_steps, self.num_train_timesteps, self.steps_offset,
                              num_points=num_inference_steps + 1)
        if self.karras:
            table = self.schedule.sigmas.double()
            sigmas = self._karras_sigmas(table[-1].item(), table[0].item(), num_inference_steps)
            t = self._sigma_to_t(sigmas).round()
        else:
            sigmas = self.schedule.sigmas[t].double()
        self._finish_table(t.long(), sigmas)
        self.x0_hats: list[torch.Tensor] = []    # x̂₀ of the previous step (the "M" in 2M)

    @staticmethod
    def _alpha_sigma(sigma):
        alpha = 1 / (sigma ** 2 + 1) ** 0.5
        return alpha, sigma * alpha

    def add_noise(self, x0, noise, t):
        """x_t = α x_0 + s ε with α, s from this run's σ table (equals √ᾱ, √(1−ᾱ) without Karras)."""
        sigma = self.sigmas.to(x0.device, x0.dtype)[self._add_noise_index(t)]
        alpha, s = self._alpha_sigma(sigma.reshape((-1,) + (1,) * (x0.ndim - 1)))
        return alpha * x0 + s * noise

    def step(self, eps, t, x, generator=None):
        sigma = self._sigma_now(t)
        i = self.step_index
        alpha_i, s_i = self._alpha_sigma(sigma)
        x0_hat = (x - s_i * eps) / alpha_i
        first_order = not self.x0_hats or i == len(self.timesteps) - 1
        x = x.to(torch.float32)

        alpha_next, s_next = self._alpha_sigma(self.sigmas[i + 1])
        lam = lambda a, s: torch.log(a) - torch.log(s)
        h = lam(alpha_next, s_next) - lam(alpha_i, s_i)
        if first_order:
            x_next = s_next / s_i * x - alpha_next * (torch.exp(-h) - 1.0) * x0_hat
        else:
            alpha_p, s_p = self._alpha_sigma(self.sigmas[i - 1])
            r = (lam(alpha_i, s_i) - lam(alpha_p, s_p)) / h
            D0, D1 = x0_hat, (1.0 / r) * (x0_hat - self.x0_hats[-1])
            x_next = (s_next / s_i * x - alpha_next * (torch.exp(-h) - 1.0) * D0
                      - 0.5 * (alpha_next * (torch.exp(-h) - 1.0)) * D1)

        self.x0_hats = [x0_hat]
        self.step_index += 1
        return StepOutput(x_next.to(eps.dtype), x0_hat)


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDPMSampler, DDIMSampler, PNDMSampler, EulerSampler,
                              EulerAncestralSampler, DPMSolverPP2MSampler)
}


def get_sampler(name: str, schedule: NoiseSchedule | None = None, **options) -> Sampler:
    """A fresh sampler by name: "ddpm", "ddim" (eta=…), "pndm", "euler", "euler_a", "dpmpp_2m"
    (the last three take karras=True). `schedule` defaults to SD v1's scaled_linear."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "schedule")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {name!r} does not take {', '.join(unknown)}; its options are "
                         f"{', '.join(accepted)}")
    return cls(schedule, **options)


@dataclass
class LoopResult:
    x: torch.Tensor                      # the last sample (the final one, or where a callback stopped)
    x0_hat: torch.Tensor | None          # the last step's x̂₀ (None if no step ran)
    steps: int                           # steps run
    stopped: bool = False                # a callback asked to stop before the end


def sample_loop(sampler: Sampler, model: Callable, x: torch.Tensor, timesteps: torch.Tensor, *,
                generator: torch.Generator | None = None, blend: Callable | None = None,
                callback: Callable | None = None) -> LoopResult:
    """The reverse process, one model call per step. The pipeline runs exactly this loop.

        for i, t in enumerate(timesteps):
            x_in = scale_input(x, t)                   the ordinary x_t, whatever scale x is kept in
            out = step(model(x_in, t), t, x)           model: any ε-prediction; the pipeline passes
                                                       its UNet with classifier-free guidance
            x = blend(i, out.prev_sample)              inpainting: put back the known region (optional)
            callback(i, t, x_in, out) is False → stop  previews, progress, trajectories (optional)

    `x` is the sampler's starting sample (for text → image: unit noise × `init_noise_sigma` after
    `set_timesteps`), `timesteps` the ones to visit (`sampler.timesteps`, or the last part of them
    for image → image). The callback's `out` holds the sample after the blend and the step's x̂₀.
    """
    result = LoopResult(x, None, 0)
    for i, t in enumerate(timesteps):
        x_in = sampler.scale_input(x, t)
        out = sampler.step(model(x_in, t), t, x, generator=generator)
        x = out.prev_sample if blend is None else blend(i, out.prev_sample)
        result = LoopResult(x, out.pred_original_sample, i + 1)
        if callback is not None and callback(i, t, x_in, StepOutput(x, out.pred_original_sample)) is False:
            result.stopped = i < len(timesteps) - 1
            break
    return result
