"""NoiseSchedule against diffusers, CompVis `ldm` and the published ᾱ values of SD's schedule."""
from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from reference import rel_err
from sdlearn.schedule import NoiseSchedule

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)


def diffusers_ddpm(name: str, n: int = 1000) -> DDPMScheduler:
    extra = SD_BETAS if name == "scaled_linear" else {}
    return DDPMScheduler(num_train_timesteps=n, beta_schedule=DIFFUSERS_NAME[name], **extra)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("n", [1000, 500])
def test_betas_and_alphas_cumprod_equal_diffusers_bit_for_bit(name, n):
    ours = getattr(NoiseSchedule, name)(n)
    ref = diffusers_ddpm(name, n)
    assert ours.betas.dtype == torch.float32 and ours.betas.shape == (n,)
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas, ref.alphas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def test_scaled_linear_is_compvis_linear():
    """CompVis calls SD's schedule "linear": linspace of square roots, squared, in float64."""
    from ldm.modules.diffusionmodules.util import make_beta_schedule
    betas64 = torch.as_tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    ours = NoiseSchedule.scaled_linear()
    assert rel_err(ours.betas, betas64) < 1e-6
    # float32 cumprod (diffusers, sdlearn) vs float64 (CompVis): equal to a few float32 ulps.
    abar64 = torch.cumprod(1 - betas64, 0)
    assert ((ours.alphas_cumprod.double() / abar64 - 1).abs().max()) < 3e-6


@pytest.mark.parametrize("name,expected", [
    ("scaled_linear", (0.9991, 0.9913, 0.2777, 0.0047)),
    ("linear", (0.9999, 0.9981, 0.0786, 0.00004)),
])
def test_alphas_cumprod_at_timesteps_1_10_500_1000(name, expected):
    abar = getattr(NoiseSchedule, name)().alphas_cumprod
    got = [abar[t - 1].item() for t in (1, 10, 500, 1000)]      # t counted from 1, as in the DDPM paper
    assert [round(v, 4 if v > 1e-3 else 5) for v in got] == list(expected)


def test_walkthrough_alpha_bar_at_500_matches_no_schedule():
    for name in ("linear", "scaled_linear", "cosine"):
        assert abs(getattr(NoiseSchedule, name)().alphas_cumprod[499].item() - 0.4477) > 0.01


def test_cosine_follows_its_formula_and_clips_beta():
    s = NoiseSchedule.cosine()
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):          # ᾱ_t = f(t+1)/f(0) while no β is clipped
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert s.betas.max().item() == pytest.approx(0.999)
    assert (s.betas <= 0.999 + 1e-7).all()


def test_derived_tensors():
    s = NoiseSchedule.scaled_linear()
    abar = s.alphas_cumprod
    assert torch.equal(s.sqrt_alphas_cumprod, abar.sqrt())
    assert torch.equal(s.sqrt_one_minus_alphas_cumprod, (1 - abar).sqrt())
    assert s.sqrt_alphas_cumprod[0] ** 2 + s.sqrt_one_minus_alphas_cumprod[0] ** 2 == pytest.approx(1.0)
    assert rel_err(s.snr(), 1 / s.sigmas ** 2) < 1e-6
    assert s.snr(499).item() == pytest.approx(abar[499].item() / (1 - abar[499].item()), rel=1e-6)
    assert torch.equal(s.log_snr(torch.tensor([3, 7])), s.log_snr()[[3, 7]])


def test_posterior_variance_matches_ddpm_formula_and_diffusers():
    """β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t. float32 loses a few digits in 1−ᾱ near t = 0, and
    diffusers recomputes β_t as 1 − ᾱ_t/ᾱ_{t−1} (losing others), hence rel 1e-4."""
    from ldm.modules.diffusionmodules.util import make_beta_schedule
    s = NoiseSchedule.scaled_linear()
    ref = diffusers_ddpm("scaled_linear")
    betas64 = torch.as_tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    abar64 = torch.cumprod(1 - betas64, 0)
    assert s.posterior_variance[0].item() == 0.0          # ᾱ_{-1} = 1: nothing before step 0
    for t in (1, 2, 10, 500, 999):
        expected = (1 - abar64[t - 1]) / (1 - abar64[t]) * betas64[t]
        assert s.posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-4)
        assert s.posterior_variance[t].item() == pytest.approx(ref._get_variance(t).item(), rel=1e-4)
    assert (s.posterior_variance[1:] < s.betas[1:]).all()   # β̃_t < β_t


def test_sigmas_and_log_snr_match_diffusers_sigma_based_schedulers():
    s = NoiseSchedule.scaled_linear()
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", **SD_BETAS)
    assert torch.equal(s.sigmas.flip(0), euler.sigmas[:-1])         # diffusers stores σ descending, then 0
    dpm = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", **SD_BETAS)
    assert rel_err(s.log_snr(), 2 * dpm.lambda_t) < 1e-6            # λ = log(α/σ) = ½ log SNR


def test_betas_must_lie_strictly_between_zero_and_one():
    """β_t = 0 would add no noise at step t and β_t = 1 would erase the signal (ᾱ = 0 from there
    on, σ = ∞): neither is a noise schedule. Nor is a table that is not 1-D."""
    assert NoiseSchedule(torch.tensor([1e-4, 0.5, 0.999])).num_train_timesteps == 3
    for betas in ([0.5, 1.0], [0.5, 1.5], [0.0, 0.5], [-0.1, 0.5], [[0.1, 0.2]]):
        with pytest.raises(ValueError, match="betas must be a 1-D tensor with every value in \\(0, 1\\)"):
            NoiseSchedule(torch.tensor(betas))


def test_repr_names_the_schedule_its_length_and_end_values():
    assert repr(NoiseSchedule.scaled_linear()) == "NoiseSchedule.scaled_linear(T=1000, β 0.00085…0.01200, ᾱ_T=0.00466)"
    assert repr(NoiseSchedule.linear(500)) == "NoiseSchedule.linear(T=500, β 0.00010…0.02000, ᾱ_T=0.00635)"


def test_q_sample_matches_diffusers_add_noise():
    s = NoiseSchedule.scaled_linear()
    ref = diffusers_ddpm("scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g)
    noise = torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(s.q_sample(x0, t, noise), ref.add_noise(x0, noise, t))
    assert torch.equal(s.q_sample(x0, 250, noise), ref.add_noise(x0, noise, torch.tensor([250] * 3)))


def test_q_sample_has_the_forward_process_statistics():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 2.0)
    x = s.q_sample(x0, 299, torch.randn(200_000, generator=g))
    abar = s.alphas_cumprod[299].item()
    assert x.mean().item() == pytest.approx(2 * abar ** 0.5, abs=0.01)
    assert x.var().item() == pytest.approx(1 - abar, abs=0.01)


def test_q_sample_rejects_bad_timesteps():
    s = NoiseSchedule.scaled_linear()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="0 … 999"):
        s.q_sample(x, 1000, x)
    with pytest.raises(ValueError, match="one timestep per batch element"):
        s.q_sample(x, torch.tensor([1, 2, 3]), x)


def test_q_sample_rejects_noise_of_another_shape_even_one_that_broadcasts():
    s = NoiseSchedule.scaled_linear()
    x0 = torch.zeros(2, 3)
    for noise in (torch.zeros(1, 3), torch.zeros(3), torch.zeros(2, 3, 1)):   # smaller ones broadcast silently
        with pytest.raises(ValueError, match=re.escape(f"noise has shape {tuple(noise.shape)} but x0 has (2, 3)")):
            s.q_sample(x0, 10, noise)


# ---- the plain functions behind notebook 03's plots and timestep slider ----------------------

def test_noise_image_is_q_sample_of_the_image_in_minus_one_to_one():
    from sdlearn import viz
    s = NoiseSchedule.scaled_linear()
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x0 = img.float() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    expected = ((s.q_sample(x0[None], 300, eps[None])[0] + 1) / 2).clamp(0, 1)
    out = viz.noise_image(img, 300, s, seed=7)
    assert out.shape == (3, 16, 16) and rel_err(out, expected) < 1e-6
    assert rel_err(viz.noise_image(img, 0, s), img.float() / 255) < 0.05      # barely noised at t=0
    late = viz.noise_image(img, 999, s, seed=7)
    assert abs(torch.corrcoef(torch.stack([late.flatten(), x0.flatten()]))[0, 1]) < 0.2


def test_plot_schedules_draws_one_line_per_schedule_and_panel_per_quantity():
    import matplotlib
    matplotlib.use("Agg")
    from sdlearn import viz
    schedules = [NoiseSchedule.linear(), NoiseSchedule.scaled_linear(), NoiseSchedule.cosine()]
    fig = viz.plot_schedules(schedules, ["alphas_cumprod", "log_snr"])
    assert len(fig.axes) == 2 and all(len(ax.lines) == 3 for ax in fig.axes)
    line = fig.axes[0].lines[1].get_ydata()
    assert torch.equal(torch.as_tensor(line), schedules[1].alphas_cumprod)
    with pytest.raises(ValueError, match="unknown quantities"):
        viz.plot_schedules(schedules, ["alpha"])


def test_cosine_betas_do_not_depend_on_the_cpus_cosine(monkeypatch):
    """diffusers computes the cosine schedule with Python's math.cos, value by value. torch.cos's
    last bit depends on the maths library the CPU gets (MKL on Intel), so sdlearn uses math.cos
    too: with torch.cos made one ulp off, the betas must not change."""
    expected = diffusers_ddpm("cosine").betas
    def cos_one_ulp_off(x, *a, **k):
        y = torch.Tensor.cos(x)
        return torch.nextafter(y, torch.full_like(y, float("inf")))
    monkeypatch.setattr(torch, "cos", cos_one_ulp_off)
    assert torch.equal(NoiseSchedule.cosine().betas, expected)
