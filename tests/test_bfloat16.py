"""bfloat16 on the CPU: dtype="auto" chooses it from what the CPU reports, the whole pipeline runs
in it, the fast CPU layers work in it, and the tiny model's pictures stay within bfloat16's
rounding of float32's and draw the same things.

The tolerances. bfloat16 keeps float32's 8-bit exponent and 8 bits of mantissa (7 stored): each
stored number is off by up to 2⁻⁹ ≈ 0.2 % of itself. A layer's output sums many rounded products
(the errors partly cancel) and the model stacks dozens of layers, so ε comes out about 1 % off
(1.3e-2 relative on an SD v1.5-size UNet, 4e-3 on one attention; README: CPU). Over 20 sampler
steps that moves a tiny-model picture by about 0.002 on average (half a level of 255), and 99 % of
its pixels by at most 0.016. The largest differences are single pixels on a shape's edge, where a
slight shift of the edge turns shape into background: up to 0.15 over the 108 one-object grammar
prompts, 0.74 over the 120 two-object ones, so the maximum is not a bound one can state; the
bounds below are 5× and 3× the measured mean and 99th percentile.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import sdlearn
from reference import rel_err
from sdlearn import analyser, fast_cpu
from sdlearn.cpu_features import parse_cpuinfo
from sdlearn.device import auto_dtype
from test_unet import THREE_LEVELS, models, inputs

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cpuinfo"
MEAN_PIXEL_TOL, P99_PIXEL_TOL = 0.01, 0.05
PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a yellow square at the bottom"]

bf16_kernels = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                       and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                  reason="this PyTorch has no oneDNN bfloat16 kernels for this CPU")


def cpu(name: str):
    return parse_cpuinfo((FIXTURES / name).read_text())


@bf16_kernels
def test_auto_is_bfloat16_where_the_cpu_multiplies_it_and_float32_elsewhere():
    assert auto_dtype("cpu", cpu("intel_xeon_sapphire_rapids.txt")) == torch.bfloat16     # AMX-BF16
    assert auto_dtype("cpu", cpu("amd_epyc.txt")) == torch.bfloat16                       # AVX512_BF16
    assert auto_dtype("cpu", parse_cpuinfo("flags\t: avx2 fma avx512f\n")) == torch.float32
    assert auto_dtype("cpu", parse_cpuinfo("Features\t: fp asimd bf16\n")) == torch.float32  # ARM: not measured


def test_auto_on_this_machine_and_bad_dtypes():
    pipe = sdlearn.load_pipeline("tiny", "cpu", "auto")
    assert pipe.dtype == auto_dtype("cpu") and pipe.unet.conv_in.weight.dtype == pipe.dtype
    assert pipe.vae.decoder.conv_in.weight.dtype == pipe.text_encoder.text_model.final_layer_norm.weight.dtype == pipe.dtype
    assert sdlearn.load_pipeline("tiny", "cpu").dtype == torch.float32       # the default stays float32
    with pytest.raises(ValueError, match='"auto"'):
        sdlearn.load_pipeline("tiny", "cpu", "fast")


def test_choose_paths_reads_the_vendor(monkeypatch):
    assert fast_cpu.choose_paths(cpu("amd_epyc.txt")) == fast_cpu.PATHS_BY_VENDOR["AMD"]
    monkeypatch.setitem(fast_cpu.PATHS_BY_VENDOR, "Intel", ("channels_last",))
    assert fast_cpu.choose_paths(cpu("intel_xeon_sapphire_rapids.txt")) == ("channels_last",)
    assert fast_cpu.choose_paths(parse_cpuinfo("")) == fast_cpu.PATHS


@bf16_kernels
def test_fast_layers_in_bfloat16_equal_the_plain_ones():
    """Every path on, in bfloat16, against the plain layers in bfloat16 (same roundings of the
    inputs; the products sum in a different order) and against float32."""
    ours = copy.deepcopy(models(THREE_LEVELS)[0])             # models() is cached: cast a copy
    latents, context = inputs(THREE_LEVELS, 2, 16, 8)
    with torch.no_grad():
        want32 = ours(latents, 300, context)
        ours.to(torch.bfloat16)
        plain = ours(latents.bfloat16(), 300, context.bfloat16())
        fast_cpu.enable(ours)
        calls = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: calls.append(type(m)) if type(m) in (fast_cpu.OneDNNLinear, fast_cpu.FusedGEGLU) else None)
        try:
            got = ours(latents.bfloat16(), 300, context.bfloat16())
        finally:
            handle.remove()
            fast_cpu.disable(ours)
    assert got.dtype == torch.bfloat16 and calls
    errors = rel_err(got.float(), plain.float()), rel_err(plain.float(), want32), rel_err(got.float(), want32)
    print("bfloat16 fast vs plain, plain vs float32, fast vs float32:", errors)
    assert max(errors) < 3e-2


@pytest.fixture(scope="module")
def pictures():
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = sdlearn.load_pipeline("tiny", "cpu", dtype)
        result = pipe.generate(PROMPTS, seed=3, progress=False)
        out[dtype] = (result.pixels, result.latents)
    return out


@bf16_kernels
def test_tiny_model_in_bfloat16_is_close_to_float32(pictures):
    (p32, _), (p16, latents) = pictures[torch.float32], pictures[torch.bfloat16]
    assert p16.dtype == torch.float32 and latents.dtype == torch.float32    # x stays float32 between steps
    diff = (p16 - p32).abs()
    assert 0 < diff.mean() <= MEAN_PIXEL_TOL, diff.mean()                    # > 0: it did run in bfloat16
    assert diff.flatten().quantile(0.99) <= P99_PIXEL_TOL, diff.flatten().quantile(0.99)


@bf16_kernels
def test_tiny_model_in_bfloat16_draws_the_same_things(pictures):
    (p32, _), (p16, _) = pictures[torch.float32], pictures[torch.bfloat16]
    for prompt, a, b in zip(PROMPTS, p32, p16):
        read32, read16 = analyser.analyse(a), analyser.analyse(b)
        assert read32["found"], prompt
        assert [read16[k] for k in ("colour", "shape", "position")] == [read32[k] for k in ("colour", "shape", "position")], prompt


@bf16_kernels
@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_samplers_and_img2img_run_in_bfloat16(sampler):
    pipe = sdlearn.load_pipeline("tiny", "cpu", torch.bfloat16)
    first = pipe.generate(PROMPTS[0], seed=1, steps=6, sampler=sampler, progress=False)
    again = pipe.generate(PROMPTS[1], seed=1, steps=6, sampler=sampler, image=first.pixels, strength=0.5,
                          progress=False)
    for r in (first, again):
        assert torch.isfinite(r.pixels).all() and r.latents.dtype == torch.float32
