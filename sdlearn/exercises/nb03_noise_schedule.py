"""Notebook 03 (the noise schedule): SD's β and ᾱ, q_sample, the DDPM posterior, one DDIM step."""
from __future__ import annotations

import torch

from ..samplers import DDIMSampler
from ..schedule import NoiseSchedule
from .core import Case, Exercise, Mistake, register

NOTEBOOK = "03_noise_schedule"


def _sd() -> NoiseSchedule:
    return NoiseSchedule.scaled_linear()


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- β and ᾱ

def _betas_cases() -> list[Case]:
    return [Case("T = 1000, beta_start = 0.00085, beta_end = 0.012 (SD v1)", (1000, 0.00085, 0.012)),
            Case("T = 50, beta_start = 0.0001, beta_end = 0.02", (50, 0.0001, 0.02)),
            Case("T = 2, beta_start = 0.00085, beta_end = 0.012", (2, 0.00085, 0.012))]


def _linear_betas(T, beta_start, beta_end):           # DDPM's schedule, not SD's
    return torch.linspace(beta_start, beta_end, T)


def _roots_not_squared(T, beta_start, beta_end):
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T)


def _linspace_squared(T, beta_start, beta_end):       # squares the β ends' linspace, no roots first
    return torch.linspace(beta_start, beta_end, T) ** 2


def _endpoint_left_out(T, beta_start, beta_end):      # T intervals instead of T points
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T + 1)[:-1] ** 2


register(Exercise(
    name="scaled_linear_betas", notebook=NOTEBOOK, capstone=True,
    reference=lambda T, beta_start, beta_end: NoiseSchedule.scaled_linear(T, beta_start, beta_end).betas,
    cases=_betas_cases,
    mistakes=[Mistake("these are evenly spaced β, DDPM's linear schedule. SD spaces the square roots √β evenly, "
                      "then squares them.", _linear_betas),
              Mistake("these look like √β: after spacing the square roots evenly, square them.", _roots_not_squared),
              Mistake("take the square roots of beta_start and beta_end before spacing them evenly; squaring "
                      "comes last.", _linspace_squared),
              Mistake("the last β should be exactly beta_end: T values from beta_start to beta_end, both ends "
                      "included.", _endpoint_left_out)],
    hint="print your first and last β next to beta_start and beta_end, then the "
         "gaps between neighbouring √β: should they all be equal?",
    atol=1e-9, rtol=1e-5))


def _abar_cases() -> list[Case]:
    return [Case("SD v1's 1000 betas", (_sd().betas,)),
            Case("DDPM's linear betas, T = 1000", (NoiseSchedule.linear().betas,)),
            Case("betas = [0.1, 0.2, 0.3, 0.4, 0.5]", (torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]),)),
            Case("a single beta, [0.02] (T = 1)", (torch.tensor([0.02]),))]


def _abar_shifted(betas):                              # ᾱ_{t−1}: the product stops one step early
    return torch.cat([torch.ones(1), torch.cumprod(1 - betas, 0)[:-1]])


def _cumprod_of_betas(betas):
    return torch.cumprod(betas, 0)


def _one_minus_cumprod(betas):
    return 1 - torch.cumprod(betas, 0)


def _whole_product(betas):                             # prod instead of cumprod: one number
    return torch.prod(1 - betas)


register(Exercise(
    name="alphas_cumprod", notebook=NOTEBOOK, capstone=True,
    reference=lambda betas: NoiseSchedule(betas).alphas_cumprod,
    cases=_abar_cases,
    mistakes=[Mistake("ᾱ is one step behind: ᾱ_t includes α_t itself, so ᾱ_0 "
                      "is not 1 but already one step of noise.", _abar_shifted),
              Mistake("the product is over the α_s of section 1, not over the β_s.", _cumprod_of_betas),
              Mistake("you subtracted from 1 after multiplying; each factor of the product "
                      "is an α_s (section 1), so the subtraction comes first.",
                      _one_minus_cumprod),
              Mistake("ᾱ has one value per timestep, shape (T,): the product up "
                      "to each t, not one product of all of them.", _whole_product)],
    hint="work out ᾱ_0 and ᾱ_1 by hand from the first two β with section 1's "
         "definition, and compare them with your first two values.",
    atol=1e-7, rtol=1e-5))


# ----------------------------------------------------------------------------------- q_sample

def _q_sample_cases() -> list[Case]:
    abar = _sd().alphas_cumprod
    return [Case("x0 (3, 4, 5, 7), t = [0, 500, 999], SD's ᾱ",
                 (_randn(3, 4, 5, 7, seed=0), torch.tensor([0, 500, 999]), _randn(3, 4, 5, 7, seed=1), abar)),
            Case("batch 1: x0 (1, 4, 8, 8), t = [0]",
                 (_randn(1, 4, 8, 8, seed=2), torch.tensor([0]), _randn(1, 4, 8, 8, seed=3), abar)),
            Case("x0 (2, 3, 4, 4), t = [999, 999]",
                 (_randn(2, 3, 4, 4, seed=4), torch.tensor([999, 999]), _randn(2, 3, 4, 4, seed=5), abar)),
            Case("2-D points: x0 (6, 2), t = [0, 1, 250, 500, 750, 999]",
                 (_randn(6, 2, seed=6), torch.tensor([0, 1, 250, 500, 750, 999]), _randn(6, 2, seed=7), abar))]


def _q_sample_reference(x0, t, noise, alphas_cumprod):
    # The package's q_sample, on a schedule whose ᾱ is the one given (β_t = 1 − ᾱ_t / ᾱ_{t−1}).
    prev = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    return NoiseSchedule(1 - alphas_cumprod / prev, alphas_cumprod=alphas_cumprod).q_sample(x0, t, noise)


def _per_sample(a, x):
    return a.reshape((-1,) + (1,) * (x.dim() - 1))


def _q_no_roots(x0, t, noise, abar):
    a = _per_sample(abar[t], x0)
    return a * x0 + (1 - a) * noise


def _q_previous_abar(x0, t, noise, abar):             # ᾱ_{t−1}: papers count t from 1
    a = _per_sample(abar[t - 1], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _q_swapped(x0, t, noise, abar):
    a = _per_sample(abar[t], x0)
    return (1 - a).sqrt() * x0 + a.sqrt() * noise


def _q_noise_root_missing(x0, t, noise, abar):
    a = _per_sample(abar[t], x0)
    return a.sqrt() * x0 + (1 - a) * noise


register(Exercise(
    name="q_sample", notebook=NOTEBOOK,
    reference=_q_sample_reference,
    cases=_q_sample_cases,
    mistakes=[Mistake("both coefficients are square roots of what you "
                      "used, so that the variance stays 1.", _q_no_roots),
              Mistake("index ᾱ with t itself: the code counts timesteps from 0 "
                      "(t − 1 wraps round to the last ᾱ at t = 0).", _q_previous_abar),
              Mistake("x0 and the noise have swapped coefficients: the image keeps √ᾱ_t, which is near 1 at "
                      "small t.", _q_swapped),
              Mistake("the noise's coefficient needs a square root too, like x0's.", _q_noise_root_missing)],
    hint="pick ᾱ_t for each sample and reshape it to (B, 1, 1, …) so that it broadcasts over "
         "x0; then compare your line with section 1's formula for x_t, term by term.",
    atol=1e-5, rtol=1e-4))


# -------------------------------------------------------------------------- DDPM posterior

def _posterior_cases() -> list[Case]:
    sd = _sd()
    return [Case("x0, x_t (2, 4, 5, 7), t = 500, SD's schedule",
                 (_randn(2, 4, 5, 7, seed=10), _randn(2, 4, 5, 7, seed=11), 500, sd.betas, sd.alphas_cumprod)),
            Case("batch 1: x0, x_t (1, 4, 8, 8), t = 999",
                 (_randn(1, 4, 8, 8, seed=12), _randn(1, 4, 8, 8, seed=13), 999, sd.betas, sd.alphas_cumprod)),
            Case("x0, x_t (1, 4, 8, 8), t = 0 (the first step)",
                 (_randn(1, 4, 8, 8, seed=14), _randn(1, 4, 8, 8, seed=15), 0, sd.betas, sd.alphas_cumprod)),
            Case("x0, x_t (3, 2), t = 1",
                 (_randn(3, 2, seed=16), _randn(3, 2, seed=17), 1, sd.betas, sd.alphas_cumprod))]


def _posterior_reference(x0, x_t, t, betas, alphas_cumprod):
    """DDPM eq. 7. The variance is the package's `posterior_variance`; the mean is the formula of
    DDPMSampler.step written with the true x0 (tests/test_exercises_nb03.py checks it against the sampler)."""
    schedule = NoiseSchedule(betas, alphas_cumprod=alphas_cumprod)
    a_t = schedule.alphas_cumprod[t]
    a_prev = schedule.alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0)
    mean = (a_prev ** 0.5 * betas[t]) / (1 - a_t) * x0 + schedule.alphas[t] ** 0.5 * (1 - a_prev) / (1 - a_t) * x_t
    return mean, schedule.posterior_variance[t]


def _posterior(x0, x_t, t, betas, abar, *, a_prev=None, variance=None, x0_coeff=None, xt_coeff=None):
    """The eq. 7 posterior with one piece changed, to write the mistakes in one line each."""
    a_t, alpha_t, beta_t = abar[t], 1 - betas[t], betas[t]
    a_prev = (abar[t - 1] if t > 0 else torch.tensor(1.0)) if a_prev is None else a_prev
    x0_coeff = a_prev ** 0.5 * beta_t / (1 - a_t) if x0_coeff is None else x0_coeff
    xt_coeff = alpha_t ** 0.5 * (1 - a_prev) / (1 - a_t) if xt_coeff is None else xt_coeff
    variance = (1 - a_prev) / (1 - a_t) * beta_t if variance is None else variance
    return x0_coeff * x0 + xt_coeff * x_t, variance


def _post_wraps(x0, x_t, t, betas, abar):             # alphas_cumprod[t − 1] also at t = 0
    return _posterior(x0, x_t, t, betas, abar, a_prev=abar[t - 1])


def _post_beta_variance(x0, x_t, t, betas, abar):     # DDPM's other choice, "fixed_large"
    return _posterior(x0, x_t, t, betas, abar, variance=betas[t])


def _post_abar_on_xt(x0, x_t, t, betas, abar):        # √ᾱ_t where √α_t belongs
    a_prev = abar[t - 1] if t > 0 else torch.tensor(1.0)
    return _posterior(x0, x_t, t, betas, abar, xt_coeff=abar[t] ** 0.5 * (1 - a_prev) / (1 - abar[t]))


def _post_no_roots(x0, x_t, t, betas, abar):
    a_prev = abar[t - 1] if t > 0 else torch.tensor(1.0)
    return _posterior(x0, x_t, t, betas, abar, x0_coeff=a_prev * betas[t] / (1 - abar[t]),
                      xt_coeff=(1 - betas[t]) * (1 - a_prev) / (1 - abar[t]))


def _post_swapped_roots(x0, x_t, t, betas, abar):     # √α_t on x0, √ᾱ_{t−1} on x_t
    a_prev = abar[t - 1] if t > 0 else torch.tensor(1.0)
    return _posterior(x0, x_t, t, betas, abar, x0_coeff=(1 - betas[t]) ** 0.5 * betas[t] / (1 - abar[t]),
                      xt_coeff=a_prev ** 0.5 * (1 - a_prev) / (1 - abar[t]))


register(Exercise(
    name="ddpm_posterior", notebook=NOTEBOOK,
    reference=_posterior_reference,
    cases=_posterior_cases,
    mistakes=[Mistake("at t = 0 there is no earlier step, so ᾱ_{−1} is 1 (indexing with t − 1 "
                      "wraps round to the last ᾱ): the variance must be 0 and the mean x0.", _post_wraps),
              Mistake("that variance is β_t, DDPM's other choice; the "
                      "posterior's variance β̃_t of section 5 is smaller.",
                      _post_beta_variance),
              Mistake("the coefficient of x_t uses one step's α_t, not the running product ᾱ_t.", _post_abar_on_xt),
              Mistake("the mean's coefficients have square roots in "
                      "section 5's formula; yours have none.", _post_no_roots),
              Mistake("the two square roots are swapped between x0 and x_t: which one sits beside β_t in section 5?",
                      _post_swapped_roots)],
    hint="compare each factor with section 5's formulas: which ᾱ sits beside x0, which α beside "
         "x_t, and what is ᾱ_{t−1} at t = 0? Return the mean and the variance as a pair.",
    atol=1e-5, rtol=1e-4))


# --------------------------------------------------------------------------------- DDIM step

def _ddim_cases() -> list[Case]:
    abar = _sd().alphas_cumprod
    return [Case("x (1, 4, 8, 8), ᾱ_t = ᾱ[981], ᾱ_prev = ᾱ[961] (the first of 50 steps; batch 1)",
                 (_randn(1, 4, 8, 8, seed=20), _randn(1, 4, 8, 8, seed=21), abar[981], abar[961])),
            Case("x (2, 4, 5, 7), ᾱ_t = ᾱ[501], ᾱ_prev = ᾱ[481]",
                 (_randn(2, 4, 5, 7, seed=22), _randn(2, 4, 5, 7, seed=23), abar[501], abar[481])),
            Case("x (1, 4, 8, 8), ᾱ_t = ᾱ[999], ᾱ_prev = ᾱ[0] (one step for the whole way)",
                 (_randn(1, 4, 8, 8, seed=24), _randn(1, 4, 8, 8, seed=25), abar[999], abar[0])),
            Case("x (3, 4, 2, 2), ᾱ_t = ᾱ[1], ᾱ_prev = ᾱ[0] (the last step of SD's grid)",
                 (_randn(3, 4, 2, 2, seed=26), _randn(3, 4, 2, 2, seed=27), abar[1], abar[0]))]


def _ddim_reference(x, eps, alpha_bar_t, alpha_bar_prev):
    # DDIMSampler.step itself, on a two-entry table [ᾱ_prev, ᾱ_t]: one step from t = 1 to t' = 0.
    sampler = DDIMSampler(eta=0.0)
    sampler.alphas_cumprod = torch.stack([torch.as_tensor(alpha_bar_prev), torch.as_tensor(alpha_bar_t)])
    sampler.num_train_timesteps, sampler.num_inference_steps = 2, 2
    sampler.timesteps = torch.tensor([1, 0])
    return sampler.step(eps, 1, x).prev_sample


def _x0_hat(x, eps, a_t):
    return (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5


def _ddim_returns_x0(x, eps, a_t, a_prev):
    return _x0_hat(x, eps, a_t)


def _ddim_no_roots(x, eps, a_t, a_prev):
    x0 = (x - (1 - a_t) * eps) / a_t
    return a_prev * x0 + (1 - a_prev) * eps


def _ddim_swapped(x, eps, a_t, a_prev):               # ᾱ_t and ᾱ_prev exchanged: a step the wrong way
    return _ddim_reference(x, eps, a_prev, a_t)


def _ddim_old_noise_level(x, eps, a_t, a_prev):       # re-noised with √(1 − ᾱ_t) instead of √(1 − ᾱ_prev)
    return a_prev ** 0.5 * _x0_hat(x, eps, a_t) + (1 - a_t) ** 0.5 * eps


register(Exercise(
    name="ddim_step", notebook=NOTEBOOK, capstone=True,
    reference=_ddim_reference,
    cases=_ddim_cases,
    mistakes=[Mistake("that is x̂₀, the clean estimate; the step must then noise it "
                      "again, with the same ε, to the earlier level ᾱ_prev.", _ddim_returns_x0),
              Mistake("every ᾱ enters through a square root, in x̂₀ and "
                      "in the step alike (as in q_sample).", _ddim_no_roots),
              Mistake("ᾱ_t and ᾱ_prev are exchanged: x̂₀ comes from x at level ᾱ_t, then moves to ᾱ_prev "
                      "(the larger one, less noise).", _ddim_swapped),
              Mistake("the noise term belongs to the new level: which ᾱ belongs to the previous step?",
                      _ddim_old_noise_level)],
    hint="two steps: first x̂₀ as in section 5 (x is at level ᾱ_t), then section 7's "
         "DDIM line with the same ε: which ᾱ belongs to the earlier step?",
    atol=1e-5, rtol=1e-4))
