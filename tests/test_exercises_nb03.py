"""Notebook 03's exercises: the references agree with the package's samplers (the DDPM posterior
mean is written out in the exercise, so it is checked here against DDPMSampler.step), and a
learner's usual answers, written independently, pass."""
from __future__ import annotations

import torch

from sdlearn import exercises
from sdlearn.device import randn
from sdlearn.samplers import DDIMSampler, DDPMSampler
from sdlearn.schedule import NoiseSchedule

EX = exercises.EXERCISES


def test_the_posterior_reference_is_the_ddpm_samplers_step():
    """On the full 1000-step chain DDPMSampler.step draws x_{t−1} = μ̃(x̂₀, x_t) + √β̃_t z; with ε
    chosen so that x̂₀ is the given x0, taking away the same seeded z leaves the exercise's mean."""
    sd = NoiseSchedule.scaled_linear()
    sampler = DDPMSampler(sd, steps_offset=0)
    sampler.set_timesteps(1000)
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g)
    for t in (999, 500, 1, 0):
        a_t = sd.alphas_cumprod[t]
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        mean, variance = EX["ddpm_posterior"].reference(x0, x_t, t, sd.betas, sd.alphas_cumprod)
        stepped = sampler.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        z = randn(x_t.shape, torch.Generator().manual_seed(t)) if t > 0 else torch.zeros_like(x_t)
        assert torch.allclose(stepped - variance.clamp(min=1e-20).sqrt() * z, mean, atol=1e-4), t
        assert variance == sd.posterior_variance[t]
    assert EX["ddpm_posterior"].reference(x0, x_t, 0, sd.betas, sd.alphas_cumprod)[1] == 0


def test_the_ddim_reference_is_the_samplers_step():
    sd = NoiseSchedule.scaled_linear()
    sampler = DDIMSampler(sd)
    sampler.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t, prev in ((981, 961), (21, 1), (1, 0)):       # (1 → ᾱ_0: SD's set_alpha_to_one=False)
        expected = sampler.step(eps, t, x).prev_sample
        got = EX["ddim_step"].reference(x, eps, sd.alphas_cumprod[t], sd.alphas_cumprod[prev])
        assert torch.equal(got, expected), t


def test_the_q_sample_reference_is_the_schedules():
    sd = NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(EX["q_sample"].reference(x0, t, noise, sd.alphas_cumprod), sd.q_sample(x0, t, noise))


def test_a_learners_answers_pass():
    def q_sample(x0, t, noise, alphas_cumprod):
        a = alphas_cumprod[t].reshape(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def ddpm_posterior(x0, x_t, t, betas, alphas_cumprod):
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0)
        mean = (a_prev.sqrt() * betas[t] * x0 + (1 - betas[t]).sqrt() * (1 - a_prev) * x_t) / (1 - a_t)
        return mean, (1 - a_prev) / (1 - a_t) * betas[t]

    def betas64(T, beta_start, beta_end):              # computed in float64, as CompVis does
        import numpy as np
        return torch.from_numpy(np.linspace(beta_start ** 0.5, beta_end ** 0.5, T) ** 2).float()

    for name, fn in [("q_sample", q_sample), ("ddpm_posterior", ddpm_posterior), ("scaled_linear_betas", betas64)]:
        report = exercises.run_check(name, fn)
        assert report.passed, report.message


def test_the_capstone_pieces_of_notebook_03():
    assert {"scaled_linear_betas", "alphas_cumprod", "ddim_step"} <= set(exercises.PIECES)
    assert all(EX[n].capstone for n in ("scaled_linear_betas", "alphas_cumprod", "ddim_step"))
    assert not EX["q_sample"].capstone and not EX["ddpm_posterior"].capstone
    assert exercises.list_exercises("03_noise_schedule") == [
        "scaled_linear_betas", "alphas_cumprod", "q_sample", "ddpm_posterior", "ddim_step"]


def test_notebook_03_holds_each_exercise_the_nbgrader_way_in_under_2000_words():
    from classroom_cells import exercise_problems, main_body_words
    problems = [p for name in exercises.list_exercises("03_noise_schedule")
                for p in exercise_problems("03_noise_schedule", name)]
    assert problems == []
    assert main_body_words("03_noise_schedule") <= 2000
