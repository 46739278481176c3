"""The benchmark scripts run (at tiny sizes, in seconds) and print what they promise; `pipe.compile()`
gives the eager pipeline's images.

The figures themselves are not asserted: they depend on the machine. What is asserted is that each
table has its rows, that every ratio is a positive number, and that the outputs the scripts compare
agree within the parity tolerances (so a benchmark can never time two different computations).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import sdlearn

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def _rows(table: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| variant") and "---" not in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_cpu_benchmark_tiny_prints_every_row(capsys):
    import run_cpu

    text = run_cpu.main(["--tiny", "--quick", "--steps", "2", "--threads", "1",
                         "--only", "unet,vae,text,image,load,tiny"])
    rows = _rows(text)
    names = list(rows)[1:]                                 # the first is the header
    expected = ["load the single file", "peak RSS", "UNet call", "VAE decode", "text encoder", "whole 64×64 image",
                "tiny model"]
    for start in expected:
        assert any(n.startswith(start) for n in names), f"no row {start!r} in\n{text}"
    for name in names:
        cells = rows[name]
        ratio = float(cells[5])
        assert 0 < ratio < 100, f"{name}: ratio {ratio}"
        assert len(cells) == 9, f"a stray '|' in {cells}"
        note = cells[-1]
        if name.startswith(("UNet", "VAE", "text")):
            m = re.search(r"rel\. diff ([0-9.e+-]+)", note)
            assert m and float(m.group(1)) <= 1e-4, f"{name}: {note}"
        if name.startswith(("whole", "tiny")):
            m = re.search(r"max Δpixel ([0-9.e+-]+)", note)
            assert m and float(m.group(1)) <= 2e-3, f"{name}: {note}"
    assert "ratio = sdlearn / diffusers" in text


def test_cpu_benchmark_prints_the_cpu_its_peaks_and_the_bfloat16_and_openvino_rows(capsys):
    import run_cpu

    from sdlearn.cpu_features import detect

    text = run_cpu.main(["--tiny", "--quick", "--steps", "2", "--threads", "1", "--only", "unet,bf16,openvino"])
    first, second = text.splitlines()[:2]
    assert first == "CPU: " + detect().summary()
    peaks = re.search(r"float32 ([0-9.]+) TFLOP/s, bfloat16 ([0-9.]+) TFLOP/s", second)
    assert peaks and all(float(p) > 0 for p in peaks.groups()), second
    rows = _rows(text)
    unet = rows["UNet call, latents 2×4×8×8"][-1]
    m = re.search(r"TFLOP/s sdlearn ([0-9.]+), diffusers ([0-9.]+) \(peak ([0-9.]+); sdlearn (\d+) %\)", unet)
    assert m and 0 < float(m.group(1)) < float(m.group(3)), unet
    bf16 = {name: cells for name, cells in rows.items() if "(bf16)" in name}
    assert len(bf16) == 3, text
    for name, cells in bf16.items():               # both sides in bfloat16: they agree to its rounding
        m = re.search(r"(rel\. diff|max Δpixel) ([0-9.e+-]+)", cells[-1])
        assert m and float(m.group(2)) <= 3e-2, f"{name}: {cells[-1]}"
    if importlib.util.find_spec("openvino") is None:   # a bench-only extra: the report says it is missing
        assert "(skipped: openvino is not installed" in text, text
    else:
        assert "skipped" not in text, text
        for name, tol in (("UNet call, float32", 1e-4), ("VAE decode to 64×64, float32", 1e-4),   # same models
                          ("UNet call, bfloat16", 3e-2), ("VAE decode to 64×64, bfloat16", 3e-2)):
            assert float(rows[name][-1].split()[2].rstrip(";")) <= tol, rows[name]


def test_tflops_note_is_flops_over_the_median_time():
    import cpu_peers

    note = cpu_peers.achieved(2e12, [1.0, 4.0, 2.0], [4.0, 4.0, 4.0], peak=8e12)
    assert note == "TFLOP/s sdlearn 1.000, diffusers 0.500 (peak 8.000; sdlearn 12 %)"


def test_gpu_benchmark_runs_on_the_cpu_at_tiny_size(capsys):
    import gpu

    text = gpu.main(["--tiny", "--no-compile", "--steps", "2", "--repeats", "1"])
    assert "these are not GPU figures" in capsys.readouterr().err
    rows = _rows(text)
    assert set(rows) == {"sdlearn", "diffusers"}, text
    assert float(rows["diffusers"][3]) == 1.0                            # the baseline's own ratio
    assert float(rows["sdlearn"][3]) > 0
    assert float(rows["sdlearn"][-1]) <= 2e-3                            # same image as diffusers


@pytest.fixture(scope="module")
def tiny_pair():
    eager = sdlearn.load_pipeline("tiny", "cpu", torch.float32)
    again = sdlearn.load_pipeline("tiny", "cpu", torch.float32)
    return eager, again


def _image(pipe):
    return pipe.generate("a red circle on the left", steps=3, seed=7, progress=False).pixels


def test_compile_traces_the_whole_pipeline_and_keeps_the_images(tiny_pair):
    """torch.compile's tracer (dynamo) through sdlearn's UNet and VAE decoder, with the "aot_eager"
    backend: the traced graph runs op by op, so this checks the tracing (the oneDNN paths stepping
    aside, no graph breaks that fail) in seconds; `test_compile_inductor` compiles for real."""
    eager, other = tiny_pair
    torch._dynamo.reset()
    compiled = other.compile(backend="aot_eager")
    assert compiled is other
    with torch.inference_mode():
        want, got = _image(eager), _image(compiled)
    assert (want - got).abs().max().item() <= 2e-3
    assert compiled.unet.state_dict().keys() == eager.unet.state_dict().keys()


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor needs a C++ compiler")
def test_compile_inductor(tiny_pair):
    """The real thing: inductor's generated C++ (about 35 s on 2 cores)."""
    eager = tiny_pair[0]
    compiled = sdlearn.load_pipeline("tiny", "cpu", torch.float32)
    torch._dynamo.reset()
    compiled.compile()
    with torch.inference_mode():
        want, got = _image(eager), _image(compiled)
    assert (want - got).abs().max().item() <= 2e-3


@pytest.mark.full
def test_gpu_benchmark_compiled_variants_on_the_cpu(capsys):
    import gpu

    torch._dynamo.reset()
    rows = _rows(gpu.main(["--tiny", "--steps", "2", "--repeats", "1"]))
    assert set(rows) == {"sdlearn", "diffusers", "sdlearn compiled", "diffusers compiled"}
    for cells in rows.values():
        assert float(cells[-1]) <= 2e-3


def test_unet_ablation_switches_each_speed_path(capsys):
    """bench/unet_ablation.py switches sdlearn's speed paths on one by one (fast_cpu.enable): with none on the
    UNet must compute exactly what diffusers' does (the same operations), and every variant must
    stay within the parity tolerance."""
    import unet_ablation

    rows = _rows(unet_ablation.main(["--tiny", "--repeats", "1"]))
    assert list(rows) == unet_ablation.NAMES + ["diffusers"]
    errors = {name: float(cells[-1]) for name, cells in rows.items()}
    assert errors["plain layers, NCHW"] <= 1e-6
    assert max(errors.values()) <= 1e-4


def test_unet_ablation_profiles_one_call_of_each(capsys):
    import unet_ablation

    text = unet_ablation.main(["--tiny", "--profile"])
    assert "=== sdlearn ===" in text and "=== diffusers ===" in text
    ours = text.split("=== diffusers ===")[0]
    assert "mkldnn::_linear_pointwise" in ours                 # the oneDNN paths are what runs


def test_pndm_window_is_pndm_on_every_step_and_ddim_after_the_warm_up_on_none():
    """bench/tiny_quality.py's windows table: the variant must be PNDM exactly when its window holds
    every step, and step as DDIM (the newest ε alone) outside it, so that the table measures
    where the Adams–Bashforth mix does its damage and nothing else."""
    import tiny_quality

    from sdlearn.samplers import DDIMSampler, PNDMSampler, sample_loop
    from sdlearn.schedule import NoiseSchedule

    schedule = NoiseSchedule.scaled_linear()
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def model(x, t):                       # a smooth nonlinear stand-in for the UNet
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, x)) + x * (t / 1000)

    def run(sampler, steps=20):
        sampler.set_timesteps(steps)
        x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * sampler.init_noise_sigma
        return sample_loop(sampler, model, x, sampler.timesteps).x

    def window(span):
        return type("Window", (tiny_quality.PNDMWindow,), {"window": span, "visited": []})(schedule)

    assert torch.equal(run(window(range(2, 21))), run(PNDMSampler(schedule)))
    assert not torch.allclose(run(window(range(0))), run(PNDMSampler(schedule)), atol=1e-4)
    # outside its window, a step from the same (ε, t, x) is DDIM's: DDIM's formula goes through x̂₀,
    # PNDM's transfer does not, so the two round differently (a float32 ulp or two of |x|: rtol)
    none, ddim = window(range(0)), DDIMSampler(schedule)
    none.set_timesteps(20)
    ddim.set_timesteps(20)
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    for t in none.timesteps[:2]:                                      # the warm-up: PNDM's own
        none.step(model(x, t), t, x)
    t = none.timesteps[2]
    assert torch.allclose(none.step(model(x, t), t, x).prev_sample, ddim.step(model(x, t), t, x).prev_sample,
                          rtol=1e-5, atol=1e-6)
    # a window in the middle, call by call along one run: PNDM's step inside it (from PNDM's memory of
    # every ε, those outside included), DDIM's outside it after the warm-up
    inside = range(7, 12)
    variant, pndm, ddim = window(inside), PNDMSampler(schedule), DDIMSampler(schedule)
    for s in (variant, pndm, ddim):
        s.set_timesteps(20)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * variant.init_noise_sigma
    for call, t in enumerate(variant.timesteps):
        e = model(x, t)
        got, as_pndm = variant.step(e, t, x).prev_sample, pndm.step(e, t, x).prev_sample
        want = as_pndm if call < 2 or call in inside else ddim.step(e, t, x).prev_sample
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"call {call}, t = {int(t)}"
        x = got
    assert variant.visited == [int(t) for t in variant.timesteps]
    assert variant.visited[2] == 901 and variant.visited[-1] == 1       # the labels the bench prints


def test_largest_eigenvalue_finds_each_samples_own_by_power_iteration():
    """bench/tiny_quality.py's stiffness table: power iteration on a batch whose samples the map
    treats separately must return each sample's eigenvalue of largest size, sign included."""
    import tiny_quality

    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    values = torch.tensor([-3.0, 1.5, 1.0, 0.5, -0.2, 0.1], dtype=torch.float64)
    a = q @ torch.diag(values) @ q.T                               # symmetric, largest |λ| = −3
    scale = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)    # sample b: scale[b] · a

    def f(x):                                                      # (3, 2, 3) → (3, 2, 3)
        return scale[:, None, None] * (x.flatten(1) @ a.T).view_as(x) + 0.01 * x.flatten(1).norm(dim=1)[:, None, None]

    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = tiny_quality.largest_eigenvalue(f, x, iters=60)
    jac = [torch.autograd.functional.jacobian(lambda v: f(v.view(1, 2, 3).expand(3, 2, 3))[b].flatten(), x[b].flatten())
           for b in range(3)]
    want = [max(torch.linalg.eigvals(j).real.tolist(), key=abs) for j in jac]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=2e-3), (got, want)
    assert got[1] > 0 > got[0]                                     # −0.5 · −3: the sign follows


def test_exact_guided_stiffness_is_the_jacobian_of_the_exact_denoiser():
    """The exact denoiser of a finite set: x̂₀(x̄) = Σ w_i z_i, w ∝ prior_i exp(−|x̄ − z_i|²/2σ²),
    ε̂ = (x̄ − x̂₀)/σ, guided ε̂_u + g(ε̂_c − ε̂_u). The closed form (posterior covariances) must be
    σ times the eigenvalue of largest size of that ε̂'s Jacobian, taken by autograd."""
    import tiny_quality

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40, 3, generator=gen, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    weights = torch.rand(40, generator=gen, dtype=torch.float64) * (torch.arange(40) % 3 == 0)   # a conditional subset
    sigma, g = 1.3, 7.5
    xbar = torch.randn(3, generator=gen, dtype=torch.float64)

    def x0(v, prior):
        logits = -((z - v) ** 2).sum(1) / (2 * sigma ** 2) + prior
        return torch.softmax(logits, 0) @ z

    def eps(v):
        e_u = (v - x0(v, torch.zeros(40, dtype=torch.float64))) / sigma
        e_c = (v - x0(v, torch.where(weights > 0, weights.clamp_min(1e-300).log(), -torch.inf))) / sigma
        return e_u + g * (e_c - e_u)

    jac = torch.autograd.functional.jacobian(eps, xbar)
    want = sigma * max(torch.linalg.eigvals(jac).real.tolist(), key=abs)
    got, top_u, top_c = tiny_quality.exact_guided_stiffness(xbar, z, weights, sigma, g)
    assert abs(got - want) < 1e-9 * max(1.0, abs(want)), (got, want)
    log_lik = -((z - xbar) ** 2).sum(1) / (2 * sigma ** 2)
    assert top_u == pytest.approx(torch.softmax(log_lik, 0).max().item(), rel=1e-12)
    conditional = torch.where(weights > 0, log_lik + weights.clamp_min(1e-300).log(), -torch.inf)
    assert top_c == pytest.approx(torch.softmax(conditional, 0).max().item(), rel=1e-12)


def test_caption_weights_follow_what_mistakes_say():
    """P(the caption names the prompt's colour and shape | picture) for one-object pictures, against
    shapes.mistake drawn many times. Its re-draws around held-out pairs count: from a blue square,
    "a blue circle" is said in 19 % of mistakes, not the 17 % that ignoring them would give."""
    import numpy as np
    import tiny_quality

    from sdlearn import shapes

    picture = {"shapes": [{"colour": "blue", "shape": "square", "size": "large", "position": "left"}]}
    rng = np.random.default_rng(0)
    draws = [shapes.mistake(picture["shapes"], rng)[0] for _ in range(100_000)]
    noise = 0.3
    for colour, shape in [("blue", "square"), ("red", "square"), ("blue", "circle"), ("red", "circle")]:
        prompt = {"colour": colour, "shape": shape, "position": "left"}
        got = tiny_quality.caption_weights(prompt, [picture], noise)[0].item()
        said = np.mean([d["colour"] == colour and d["shape"] == shape for d in draws])
        want = (1 - noise) if (colour, shape) == ("blue", "square") else noise * said
        assert abs(got - want) <= 0.06 * want, (colour, shape, got, want)
    assert tiny_quality.caption_weights({"colour": "orange", "shape": "square", "position": "left"},
                                        [picture], noise).item() == 0.0      # held out: never said
    elsewhere = {"colour": "blue", "shape": "square", "position": "right"}
    two = {"shapes": picture["shapes"] * 2}
    assert tiny_quality.caption_weights(elsewhere, [picture, two], noise).tolist() == [0.0, 0.0]
    assert tiny_quality.caption_weights({**elsewhere, "position": None}, [picture], noise).item() == 1 - noise


def test_exact_denoiser_is_the_toy_ideal_denoiser_of_point_masses():
    """bench/tiny_quality.py's exact table: the exact ε̂ of a finite set (each row its own
    conditional weights) must equal sdlearn.toy's ideal denoiser of the same points as a mixture of
    zero-width Gaussians, the conditional being the points of one class, at any guidance."""
    import tiny_quality

    from sdlearn import toy
    from sdlearn.schedule import NoiseSchedule

    gen = torch.Generator().manual_seed(0)
    points = torch.randn(12, 4, generator=gen, dtype=torch.float64) * 1.5
    labels = torch.arange(12) % 3
    mixture = toy.GaussianMixture(points, torch.zeros(12, dtype=torch.float64),
                                  torch.full((12,), 1 / 12, dtype=torch.float64), labels)
    schedule = NoiseSchedule.scaled_linear()
    weights = torch.stack([(labels == c).double() for c in (0, 2)])          # row 0: class 0, row 1: class 2
    x = torch.randn(2, 1, 2, 2, generator=gen, dtype=torch.float64)
    for t, g in [(901, 7.5), (451, 1.0), (101, 3.0)]:
        got = tiny_quality.ExactDenoiser(points, weights, schedule, g)(x, t)
        for row, c in enumerate((0, 2)):
            want = toy.IdealDenoiser(mixture, schedule, label=c, guidance=g)(x[row].flatten()[None], t)
            assert torch.allclose(got[row].flatten(), want[0], rtol=1e-9, atol=1e-12), (t, g, c)


def test_ddim_states_are_what_the_model_sees_at_each_timestep(tiny_pair):
    """The stiffness table's states: the x keyed by t must be the x the guided UNet is called on at
    t (DDIM's scale_input is the identity), not the one a step earlier or later."""
    import tiny_quality
    from unittest import mock

    pipe, _ = tiny_pair
    seen = {}
    real = pipe.eps_model

    def recording(context, guidance, recorder=None):
        model = real(context, guidance)

        def call(x, t):
            seen[int(t)] = x.clone()
            return model(x, t)
        return call

    with mock.patch.object(pipe, "eps_model", recording):
        ts, states = tiny_quality.ddim_states(pipe, ["a red circle", "a blue square on the left"], 4, seed=3)
    assert ts == list(seen) and sorted(states) == sorted(ts[1:])
    for t in ts[1:]:
        assert torch.equal(states[t], seen[t]), t
