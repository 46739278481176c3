"""Samplers match diffusers' schedulers, step by step, for the SD v1.5 scheduler configuration.

A fixed fake model (a random linear map of x plus a function of the — possibly fractional —
timestep) stands in for the UNet, so that a wrong timestep, a wrong scale of the input or a
wrong coefficient all change the trajectory. Both sides start from the same x_T and, for the
stochastic samplers, from generators seeded alike.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler)

from reference import rel_err
from sdlearn.samplers import SAMPLERS, SigmaSampler, get_sampler, leading_timesteps
from sdlearn.schedule import NoiseSchedule

# The scheduler configuration shipped with SD v1.5 (as diffusers fills it in for a PNDMScheduler).
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=True,
            clip_sample=False, prediction_type="epsilon", trained_betas=None)

REFERENCE = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
}
TOL = 1e-5
STEPS = (1, 2, 5, 20, 50)
SCHEDULE = NoiseSchedule.scaled_linear()


class FakeUNet:
    """ε(x, t) = W x + 0.3 x + b · (sin(t/97) + cos(t/300)), per pixel over channels."""

    def __init__(self, channels: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(channels, channels, generator=g) / channels ** 0.5 * 0.5
        self.b = torch.randn(channels, 1, 1, generator=g)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        return (torch.einsum("oc,bchw->bohw", self.W.to(x.dtype), x) + 0.3 * x
                + self.b * (torch.sin(t / 97) + torch.cos(t / 300))).to(x.dtype)


MODEL = FakeUNet()


def reference_scheduler(name: str, karras: bool = False, **config):
    cls, extra = REFERENCE[name]
    config = {**SD15, **extra, **config}
    if karras and name != "euler_a":
        config["use_karras_sigmas"] = True
    sched = cls.from_config(config)
    return sched


def set_reference_timesteps(sched, name: str, n: int, karras: bool) -> None:
    sched.set_timesteps(n)
    if karras and name == "euler_a":
        # diffusers' Euler ancestral has no Karras option (the config entry is ignored), so the
        # reference is its ancestral step on the Karras σ table of diffusers' Euler.
        euler = reference_scheduler("euler", karras=True)
        euler.set_timesteps(n)
        sched.sigmas, sched.timesteps = euler.sigmas.clone(), euler.timesteps.clone()


def run(sampler, x_T, *, n: int | None = None, timesteps=None, generator=None, eta=None,
        reference=False):
    """The sampling loop of a diffusers pipeline; returns [(t, x_prev, x0_hat or None), …]."""
    x = x_T * sampler.init_noise_sigma if timesteps is None else x_T
    timesteps = sampler.timesteps if timesteps is None else timesteps
    out = []
    for t in timesteps:
        if reference:
            inp = sampler.scale_model_input(x, t)
        else:
            inp = sampler.scale_input(x, t)
        eps = MODEL(inp, t)
        kwargs = {}
        if generator is not None:
            kwargs["generator"] = generator
        if eta is not None:
            kwargs["eta"] = eta
        res = sampler.step(eps, t, x, **kwargs)
        x = res.prev_sample
        x0 = getattr(res, "pred_original_sample", None)
        if reference and x0 is None and hasattr(sampler, "model_outputs"):
            x0 = sampler.model_outputs[-1]            # DPM-Solver++ keeps its x̂₀ here
        out.append((t, x, x0))
    return out


def x_T(seed: int = 1, shape=(2, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_same_trajectory(ours, ref, label: str) -> float:
    assert len(ours) == len(ref), f"{label}: {len(ours)} steps vs {len(ref)}"
    worst = 0.0
    for i, ((t, x, x0), (t_ref, x_ref, x0_ref)) in enumerate(zip(ours, ref)):
        assert float(t) == float(t_ref), f"{label} step {i}: timestep {t} vs {t_ref}"
        err = rel_err(x, x_ref)
        if x0_ref is not None:
            err = max(err, rel_err(x0, x0_ref))
        assert err <= TOL, f"{label} step {i} (t={float(t)}): relative error {err:.2e} > {TOL}"
        worst = max(worst, err)
    return worst


def compare(name: str, n: int, karras: bool = False, eta: float | None = None, seed: int = 0) -> float:
    ref = reference_scheduler(name, karras)
    set_reference_timesteps(ref, name, n, karras)
    options = {"karras": True} if karras else {}
    if eta is not None:
        options["eta"] = eta
    ours = get_sampler(name, SCHEDULE, **options)
    ours.set_timesteps(n)

    assert ours.timesteps.dtype == ref.timesteps.dtype, name
    assert torch.equal(ours.timesteps, ref.timesteps), f"{name} {n}: {ours.timesteps} vs {ref.timesteps}"
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)

    stochastic = ours.stochastic
    g_ours = torch.Generator().manual_seed(seed) if stochastic else None
    g_ref = torch.Generator().manual_seed(seed) if stochastic else None
    a = run(ours, x_T(), generator=g_ours)
    b = run(ref, x_T(), generator=g_ref, eta=eta, reference=True)
    return assert_same_trajectory(a, b, f"{name} karras={karras} N={n}")


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name", ["ddpm", "ddim", "pndm", "euler", "euler_a", "dpmpp_2m"])
def test_sampler_matches_diffusers_step_by_step(name, n):
    compare(name, n)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m"])
def test_karras_sigmas_match_diffusers(name, n):
    compare(name, n, karras=True)


@pytest.mark.parametrize("n", STEPS)
def test_ddim_with_eta_matches_diffusers(n):
    compare("ddim", n, eta=0.7)


def test_ddpm_1000_steps_matches_diffusers():
    """The full DDPM chain t = 999 … 0 (steps_offset=0: with SD's offset of 1, 1000 steps would
    start at t = 1000, which diffusers indexes out of range and sdlearn refuses)."""
    ref = DDPMScheduler.from_config({**SD15, "steps_offset": 0})
    ref.set_timesteps(1000)
    ours = get_sampler("ddpm", SCHEDULE, steps_offset=0)
    ours.set_timesteps(1000)
    assert torch.equal(ours.timesteps, torch.arange(999, -1, -1))
    assert torch.equal(ours.timesteps, ref.timesteps)
    shape = (1, 4, 2, 2)
    a = run(ours, x_T(shape=shape), generator=torch.Generator().manual_seed(3))
    b = run(ref, x_T(shape=shape), generator=torch.Generator().manual_seed(3), reference=True)
    assert_same_trajectory(a, b, "ddpm 1000")


def test_ddpm_1000_steps_with_offset_explains_the_problem():
    with pytest.raises(ValueError, match="1000.*steps_offset=0"):
        get_sampler("ddpm").set_timesteps(1000)


def test_stochastic_samplers_depend_on_the_generator():
    for name, options in [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_a", {})]:
        results = []
        for seed in (0, 1):
            s = get_sampler(name, **options)
            s.set_timesteps(5)
            results.append(run(s, x_T(), generator=torch.Generator().manual_seed(seed))[-1][1])
        assert rel_err(results[0], results[1]) > 1e-3, name


def test_sd15_50_step_timesteps_are_leading_with_offset():
    s = get_sampler("ddim")
    s.set_timesteps(50)
    assert s.timesteps.dtype == torch.int64
    assert s.timesteps[:3].tolist() == [981, 961, 941] and s.timesteps[-1].item() == 1
    assert torch.equal(s.timesteps, torch.arange(981, 0, -20))
    assert torch.equal(leading_timesteps(50), s.timesteps)


def test_pndm_repeats_the_second_timestep():
    s = get_sampler("pndm")
    s.set_timesteps(20)
    assert s.timesteps[:5].tolist() == [951, 901, 901, 851, 801]
    assert len(s.timesteps) == 21 and s.timesteps[-1].item() == 1


def test_final_ddim_step_lands_on_alphas_cumprod_0_not_1():
    """set_alpha_to_one=False: the last step goes to ᾱ_0, so x_prev = √ᾱ_0 x̂₀ + √(1−ᾱ_0) ε."""
    s = get_sampler("ddim")
    s.set_timesteps(50)
    x = x_T()
    eps = MODEL(x, 1)
    out = s.step(eps, 1, x)
    a0 = SCHEDULE.alphas_cumprod[0]
    expected = a0.sqrt() * out.pred_original_sample + (1 - a0).sqrt() * eps
    assert rel_err(out.prev_sample, expected) < 1e-6
    assert rel_err(out.prev_sample, out.pred_original_sample) > 1e-3   # not x̂₀ itself


def test_pred_original_sample_is_x0_hat_for_every_sampler():
    for name in SAMPLERS:
        s = get_sampler(name)
        s.set_timesteps(10)
        t = s.timesteps[0]
        x = x_T() * s.init_noise_sigma
        inp = s.scale_input(x, t)
        eps = MODEL(inp, t)
        out = s.step(eps, t, x)
        a = SCHEDULE.alphas_cumprod[int(t)]
        x0 = (inp - (1 - a).sqrt() * eps) / a.sqrt()        # in the ordinary (VP) x_t space
        assert rel_err(out.pred_original_sample, x0) < 1e-5, name


def test_set_timesteps_resets_history():
    for name in ("pndm", "dpmpp_2m", "euler"):
        s = get_sampler(name)
        s.set_timesteps(5)
        run(s, x_T())
        s.set_timesteps(5)
        first = run(s, x_T())
        fresh = get_sampler(name)
        fresh.set_timesteps(5)
        assert rel_err(first[-1][1], run(fresh, x_T())[-1][1]) == 0.0, name


def test_unknown_sampler_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="ddpm, ddim, pndm, euler, euler_a, dpmpp_2m"):
        get_sampler("k_lms")


def test_unknown_option_lists_the_sampler_options():
    with pytest.raises(ValueError, match="'euler' does not take eta; its options are karras, steps_offset"):
        get_sampler("euler", eta=0.5)
    assert get_sampler("ddim", eta=0.5).eta == 0.5


# ---- img2img: the timesteps a strength leaves, and the noise added at the first of them -----

@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("n,strength", [(20, 0.8), (50, 0.3), (5, 1.0), (20, 0.5)])
def test_img2img_timesteps_and_add_noise_match_diffusers(name, n, strength):
    ref = reference_scheduler(name)
    ref.set_timesteps(n)
    # diffusers' StableDiffusionImg2ImgPipeline.get_timesteps
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    ref_timesteps = ref.timesteps[t_start * ref.order:]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)

    ours = get_sampler(name, SCHEDULE)
    timesteps = ours.timesteps_for_strength(n, strength)
    assert torch.equal(timesteps, ref_timesteps)

    x0 = x_T(seed=5)
    noise = x_T(seed=6)
    latent_timestep = timesteps[:1].repeat(x0.shape[0])
    noisy = ours.add_noise(x0, noise, latent_timestep)
    noisy_ref = ref.add_noise(x0, noise, ref_timesteps[:1].repeat(x0.shape[0]))
    assert rel_err(noisy, noisy_ref) <= 1e-6

    gen = torch.Generator().manual_seed(4) if ours.stochastic else None
    gen_ref = torch.Generator().manual_seed(4) if ours.stochastic else None
    a = run(ours, noisy, timesteps=timesteps, generator=gen)
    b = run(ref, noisy_ref, timesteps=ref_timesteps, generator=gen_ref, reference=True)
    assert_same_trajectory(a, b, f"img2img {name} N={n} strength={strength}")


def test_img2img_karras_add_noise_matches_diffusers():
    for name in ("euler", "dpmpp_2m"):
        ref = reference_scheduler(name, karras=True)
        ref.set_timesteps(20)
        ref.set_begin_index(6)
        ours = get_sampler(name, karras=True)
        timesteps = ours.timesteps_for_strength(20, 0.7)
        assert torch.equal(timesteps, ref.timesteps[6:])
        x0, noise = x_T(5), x_T(6)
        t = timesteps[:1].repeat(2)
        assert rel_err(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) <= 1e-6


def test_add_noise_before_any_step_looks_the_timestep_up_like_diffusers():
    """Without a start index (no img2img set-up, no step yet) a σ-sampler finds σ by looking the
    timestep up in its table: the second of two equal entries (50 Karras steps round t = 1
    twice), the last σ for a timestep that is not on the chain — as diffusers'
    DPMSolverMultistepScheduler.index_for_timestep does."""
    ref = reference_scheduler("dpmpp_2m", karras=True)
    ref.set_timesteps(50)
    ours = get_sampler("dpmpp_2m", karras=True)
    ours.set_timesteps(50)
    table = ours.timesteps.tolist()
    assert table.count(1) == 2 and 500 not in table
    x0, noise = x_T(5), x_T(6)
    for t in (table[0], 1, 500):
        ts = torch.tensor([t, t])
        assert rel_err(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts)) <= 1e-6, t
    last = ours.sigmas[len(table) - 1]
    assert 0 < last < ours.sigmas[len(table) - 2]                  # the last σ of the chain, not the final 0
    assert torch.equal(ours.add_noise(x0, noise, torch.tensor([500, 500])),
                       ours._alpha_sigma(last)[0] * x0 + ours._alpha_sigma(last)[1] * noise)


def test_img2img_strength_too_small_explains():
    with pytest.raises(ValueError, match="no step"):
        get_sampler("ddim").timesteps_for_strength(10, 0.05)


def test_noise_from_a_cpu_generator_is_device_independent():
    """The stochastic samplers draw through device.randn: on the generator's device, as diffusers'
    randn_tensor, then moved; the dtype is the one asked for."""
    from sdlearn.device import randn
    a = randn((2, 3), torch.Generator().manual_seed(0), dtype=torch.float64, device="meta")
    assert a.dtype == torch.float64 and a.device.type == "meta"        # drawn on the CPU, then moved
    b = randn((2, 3), torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(b, torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    class OnAnotherDevice:                  # what randn sees of a CUDA generator on a machine without one
        device = torch.device("cuda")
    with pytest.raises(ValueError, match="a cuda generator cannot make noise for a tensor on cpu"):
        randn((2,), OnAnotherDevice(), device="cpu")


def test_sample_loop_runs_each_step_in_order():
    """sample_loop against the plain diffusers-style loop `run` above; its callback sees what the
    model saw (the ordinary x_t, whatever scale the sampler keeps) and each step's x̂₀."""
    from sdlearn.samplers import sample_loop
    for name in ("euler_a", "pndm"):
        s = get_sampler(name)
        s.set_timesteps(5)
        seen, inputs, x0s = [], [], []
        result = sample_loop(s, MODEL, x_T() * s.init_noise_sigma, s.timesteps, generator=torch.Generator().manual_seed(2),
                             callback=lambda i, t, x_in, out: (seen.append(int(t)), inputs.append(x_in),
                                                               x0s.append(out.pred_original_sample)))
        s2 = get_sampler(name)
        s2.set_timesteps(5)
        expected = run(s2, x_T(), generator=torch.Generator().manual_seed(2))
        assert seen == [int(t) for t, _, _ in expected] and result.steps == len(expected) and not result.stopped
        assert torch.equal(result.x, expected[-1][1]) and torch.equal(result.x0_hat, expected[-1][2])
        assert torch.equal(x0s[1], expected[1][2])
        # what the model saw at step 2: the sample after step 1, scaled for the model
        s3 = get_sampler(name)
        s3.set_timesteps(5)
        if isinstance(s3, SigmaSampler):
            s3.step_index = 2
        assert torch.equal(inputs[2], s3.scale_input(expected[1][1], s3.timesteps[2]))


def test_sample_loop_blends_after_each_step_and_stops_when_asked():
    from sdlearn.samplers import sample_loop
    s = get_sampler("ddim")
    s.set_timesteps(6)
    keep = torch.zeros(2, 4, 8, 8)
    keep[..., :4] = 1                                            # the blend pins the left half to zero
    blended = []
    result = sample_loop(s, MODEL, x_T(), s.timesteps, blend=lambda i, x: blended.append(i) or x * (1 - keep),
                         callback=lambda i, t, x_in, out: i < 2)
    assert blended == [0, 1, 2] and result.steps == 3 and result.stopped
    assert (result.x[..., :4] == 0).all() and (result.x[..., 4:] != 0).all()
    last = sample_loop(s, MODEL, x_T(), s.timesteps[:2], callback=lambda *a: False)
    assert last.steps == 1 and last.stopped                      # asked to stop before the end
    end = sample_loop(s, MODEL, x_T(), s.timesteps[-1:], callback=lambda *a: False)
    assert end.steps == 1 and not end.stopped                    # stopping after the last step is no stop


@pytest.mark.parametrize("name", list(REFERENCE))
def test_float16_latents_follow_diffusers_dtype_handling(name):
    """fp16 latents (as on a GPU): the σ-samplers compute in float32 and cast back, like diffusers."""
    ref = reference_scheduler(name)
    ref.set_timesteps(5)
    ours = get_sampler(name)
    ours.set_timesteps(5)
    gen = (lambda: torch.Generator().manual_seed(0)) if ours.stochastic else (lambda: None)
    a = run(ours, x_T().half(), generator=gen())
    b = run(ref, x_T().half(), generator=gen(), reference=True)
    assert all(x.dtype == torch.float16 for _, x, _ in a)
    for (_, x, _), (_, x_ref, _) in zip(a, b):
        assert rel_err(x, x_ref) <= 1e-3


def _one_ulp_off(fn):
    """fn, but its float results one ulp higher: what another CPU's maths library may return.
    (IEEE 754 fixes +, −, ×, ÷ and √ to the last bit, not log, exp or cos: PyTorch sends them to
    MKL on Intel CPUs and to its own vector code on others, and the two can differ by an ulp.)"""
    def off(x, *args, **kwargs):
        y = fn(x, *args, **kwargs)
        return torch.nextafter(y, torch.full_like(y, float("inf"))) if y.is_floating_point() else y
    return off


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_karras_timesteps_do_not_depend_on_the_cpus_log(name, monkeypatch):
    """The Karras timesteps come from log σ. diffusers takes that log with NumPy; if sdlearn took it
    with torch.log, a one-ulp difference between the two maths libraries moves a timestep by one
    float32 ulp (seen on an Intel Xeon: 597.1300 vs 597.1301). With torch's log made one ulp off,
    sdlearn's timesteps must still equal diffusers' to the bit."""
    ref = reference_scheduler(name, karras=True)
    ref.set_timesteps(20)
    monkeypatch.setattr(torch, "log", _one_ulp_off(torch.log))
    monkeypatch.setattr(torch.Tensor, "log", _one_ulp_off(torch.Tensor.log))
    ours = get_sampler(name, karras=True)
    ours.set_timesteps(20)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)


# -- stability: the intervals notebook 06 (Going further) and the README quote --------------------
# In x̄ = x/√ᾱ and σ = √((1−ᾱ)/ᾱ), DDIM's update is Euler's method for dx̄/dσ = ε̂ and PNDM applies
# the Adams–Bashforth-4 weights to it. On the linear test equation ε̂ = λ x̄, with λ chosen at
# every timestep so that z = h·λ is the same for each step, |x̄| shrinks from step to step for z in
# (−2, 0) with Euler, only for z in (−0.3, 0) with Adams–Bashforth 4; outside it grows.
# Euler's factor is exactly 1 + z. AB4 multiplies remembered ε's, whose λ was set for their own
# step, by the current h, so it follows the constant-z recurrence only where h changes slowly:
# with 300 steps the last 100 give the largest |root| of
# ζ⁴ − ζ³ = (z/24)(55ζ³ − 59ζ² + 37ζ − 9) to within 0.4 % (1.110 at −0.35, 1.437 at −0.5, 2.528
# at −1). These pin the intervals, AB4's order, the ε's order and the last step onto ᾱ_0; a
# coefficient typo that moves the roots by < 1 % (37 → 36) passes — the step-by-step match with
# diffusers above guards the coefficients.

def _growth_per_step(name: str, z: float, steps: int = 300, last: int = 100) -> float:
    """|x̄| at the end over |x̄| `last` steps before, per step, for ε̂ = λ(t) x̄ with h(t)·λ(t) = z."""
    sampler = get_sampler(name, SCHEDULE)
    sampler.set_timesteps(steps)
    stride = 1000 // steps
    abar = SCHEDULE.alphas_cumprod.double()

    def sigma(a):
        return ((1 - a) / a).sqrt()

    def model(x, t):
        t = int(t)
        a_next = abar[t - stride] if t - stride >= 0 else abar[0]      # the last step lands on ᾱ_0
        lam = z / (sigma(a_next) - sigma(abar[t]))
        return lam * x / abar[t].sqrt()

    x = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    norms = []
    for t in sampler.timesteps:
        x = sampler.step(model(x, t), t, x).prev_sample
        a = abar[int(t) - stride] if int(t) - stride >= 0 else abar[0]
        norms.append((x / a.sqrt()).norm().item())
    return (norms[-1] / norms[-1 - last]) ** (1 / last)


@pytest.mark.parametrize("name, z, expected", [
    ("ddim", -0.25, 0.75), ("ddim", -1.8, 0.8), ("ddim", -2.2, 1.2),
    ("pndm", -0.35, 1.110), ("pndm", -0.5, 1.437), ("pndm", -1.0, 2.528),
])
def test_growth_per_step_matches_the_test_equation(name, z, expected):
    assert _growth_per_step(name, z) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("z", [-0.1, -0.2, -0.28])
def test_pndm_damps_errors_inside_its_interval(z):
    growth = _growth_per_step("pndm", z)
    assert growth < 1, f"PNDM at z = {z}: |x̄| grew {growth:.3f}× per step; −0.3 < z < 0 should damp it"
