"""sdlearn.fast_cpu: the faster CPU layers compute what the plain ones compute, and the switch
swaps them in and out without touching the weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sdlearn
from reference import randomize_, rel_err
from sdlearn import fast_cpu
from sdlearn.fast_cpu import FusedGEGLU, MatmulConv2d, OneDNNLinear
from sdlearn.unet import GEGLU
from test_unet import THREE_LEVELS, inputs, models
from test_vae import THREE_WIDTHS, check_parity, images, make_pair

needs_onednn = pytest.mark.skipif(not fast_cpu.AVAILABLE, reason="this PyTorch build has no oneDNN linear op")


def fast(layer: nn.Module, cls: type) -> nn.Module:
    layer.__class__ = cls
    return layer


@needs_onednn
@pytest.mark.parametrize("c_in, c_out, k, stride, padding, hw", [
    (8, 16, 3, 1, 1, (10, 12)), (8, 16, 3, 2, 1, (9, 13)), (8, 8, 3, 2, 1, (1, 1)), (12, 4, 3, 1, 1, (5, 7)),
    (8, 16, 1, 1, 0, (9, 13)), (8, 16, 3, 1, 0, (6, 5)), (6, 10, (1, 3), (2, 1), (0, 1), (7, 4))])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_conv_as_a_matrix_product_equals_conv2d(monkeypatch, c_in, c_out, k, stride, padding, hw, layout):
    g = torch.Generator().manual_seed(3)
    conv = fast(nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding), MatmulConv2d)
    x = torch.randn(2, c_in, *hw, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def refuse(*args):
        raise AssertionError("oneDNN's convolution was called")
    monkeypatch.setattr(fast_cpu, "MATMUL_PIXELS_PER_CHANNEL", 10**9)
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", refuse)      # so the matrix-product path must run
    with torch.no_grad():
        got = conv(x)
        want = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        conv.weight.mul_(-2)                                  # in place, as an optimizer step: seen at once
        torch.testing.assert_close(conv(x), -2 * (want - conv.bias[:, None, None]) + conv.bias[:, None, None],
                                   rtol=1e-5, atol=1e-5)
    assert set(vars(conv)) == set(vars(nn.Conv2d(c_in, c_out, k)))    # nothing cached on the module


@needs_onednn
def test_conv_uses_the_matrix_product_only_on_small_maps(monkeypatch):
    calls = []
    original = torch.nn.Conv2d._conv_forward
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", lambda self, *a: calls.append(1) or original(self, *a))
    monkeypatch.setattr(fast_cpu, "MATMUL_PIXELS_PER_CHANNEL", 0.5)
    conv3, conv1 = fast(nn.Conv2d(4, 256, 3, padding=1), MatmulConv2d), fast(nn.Conv2d(4, 4, 1), MatmulConv2d)
    with torch.no_grad():
        conv3(torch.randn(2, 4, 8, 8))
        assert calls == []                                   # 128 output pixels ≤ 0.5 × 256: matrix product
        conv3(torch.randn(2, 4, 8, 9))
        assert calls == [1]                                  # 144: oneDNN's convolution
        conv1(torch.randn(2, 4, 64, 64))
        assert calls == [1]                                  # 1×1: always a matrix product
    conv3(torch.randn(2, 4, 8, 8, requires_grad=True)).sum().backward()
    assert calls == [1, 1] and conv3.weight.grad is not None  # autograd: the plain nn.Conv2d


@needs_onednn
def test_fused_geglu_equals_the_formula():
    g = torch.Generator().manual_seed(5)
    geglu = fast(randomize_(GEGLU(16, 24)), FusedGEGLU)
    x = torch.randn(2, 9, 16, generator=g) * 3
    w, b = geglu.proj.weight, geglu.proj.bias
    want = F.linear(x, w[:24], b[:24]) * F.gelu(F.linear(x, w[24:], b[24:]))     # a · GELU(b), erf GELU
    with torch.no_grad():
        torch.testing.assert_close(geglu(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(geglu(x), want, rtol=1e-5, atol=1e-5)             # autograd path: the formula


@needs_onednn
def test_onednn_linear_equals_linear_and_keeps_autograd():
    g = torch.Generator().manual_seed(4)
    layer = fast(nn.Linear(24, 40), OneDNNLinear)
    x = torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x[:, ::2]), F.linear(x[:, ::2], layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()                     # grad mode: the plain nn.Linear path
    torch.testing.assert_close(layer.bias.grad, torch.full((40,), 14.0))


def test_the_switch_swaps_classes_and_keeps_the_weights():
    ours, _ = models(THREE_LEVELS)
    unet = type(ours)(THREE_LEVELS).eval()
    unet.load_state_dict(ours.state_dict())
    before = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    fast_cpu.enable(unet)
    assert fast_cpu.enabled(unet) == fast_cpu.PATHS
    assert type(unet.conv_in) is MatmulConv2d and type(unet.time_embedding.linear_1) is OneDNNLinear
    assert type(unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[0]) is FusedGEGLU
    assert {k: v.data_ptr() for k, v in unet.state_dict().items()} == before      # no weight copied
    fast_cpu.disable(unet)
    assert fast_cpu.enabled(unet) == ()
    assert {type(m) for m in unet.modules()}.isdisjoint({MatmulConv2d, OneDNNLinear, FusedGEGLU})
    fast_cpu.enable(unet, ["linear", "conv"])
    assert fast_cpu.enabled(unet) == ("linear", "conv")
    with pytest.raises(ValueError, match="unknown speed path"):
        fast_cpu.enable(unet, ["turbo"])


@pytest.mark.parametrize("paths", [fast_cpu.PATHS, ("channels_last",), ("conv",), ("linear", "geglu")])
def test_unet_gives_the_same_output_with_any_speed_path(paths):
    ours, ref = models(THREE_LEVELS)
    latents, context = inputs(THREE_LEVELS, 2, 16, 8)
    with torch.no_grad():
        plain = ours(latents, 300, context)
        fast_cpu.enable(ours, paths)
        try:
            got = ours(latents, 300, context)
        finally:
            fast_cpu.disable(ours)
        want = ref(latents, 300, context).sample
    assert got.is_contiguous()
    assert rel_err(got, plain) < 1e-5          # float32 rounding only
    assert rel_err(got, want) < 1e-4           # and still diffusers' UNet


def test_the_vae_runs_on_channels_last_maps_and_still_matches_diffusers():
    ours, ref = make_pair(THREE_WIDTHS)
    before = {k: v.data_ptr() for k, v in ours.state_dict().items()}
    x = images(2, 24, 32)
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain_mean, plain_images = ours.encode(x).mean, ours.decode(z)
        seen = []
        ours.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(
            memory_format=torch.channels_last)))
        fast_cpu.enable(ours, fast_cpu.PATHS)                 # the UNet's paths leave the VAE as it is
        assert fast_cpu.enabled(ours) == ("channels_last",)
        mean, decoded = ours.encode(x).mean, ours.decode(z)
        assert seen == [True]                                 # the decoder's maps are channels-last inside
        assert decoded.is_contiguous()                        # and handed back NCHW
        assert torch.equal(mean, plain_mean)                  # the encoder as it was (see fast_cpu's docstring)
        assert rel_err(decoded, plain_images) < 1e-5          # float32 rounding
        check_parity(ours, ref, x)                            # still diffusers' VAE
        fast_cpu.disable(ours)
        assert fast_cpu.enabled(ours) == ()
        seen.clear()
        ours.decode(z)
        assert seen == [False]                                # the hooks are gone
    assert {k: v.data_ptr() for k, v in ours.state_dict().items()} == before   # no weight copied or re-laid out
    assert fast_cpu.enabled(fast_cpu.enable(ours, ["linear", "conv"])) == ()
    fast_cpu.enable(ours)
    fast_cpu.enable(ours)                                     # twice: still one pair of hooks
    assert (len(ours.decoder._forward_pre_hooks), len(ours.decoder._forward_hooks)) == (1, 1)
    fast_cpu.disable(ours)
    assert (len(ours.decoder._forward_pre_hooks), len(ours.decoder._forward_hooks)) == (0, 0)
    assert not ours.encoder._forward_pre_hooks and not ours.encoder._forward_hooks
    with pytest.raises(TypeError, match="UNet and VAE"):
        fast_cpu.enable(nn.Linear(2, 2))


@pytest.mark.parametrize("latents", ["random", "flat picture"])
def test_channels_last_decoder_stays_at_float32_accuracy(latents):
    """Against a float64 decode, the channels-last decoder's float32 error is a few times the
    plain one's (its GroupNorm takes the variance in one pass), still about 1e-6 relative; also
    for a flat single-colour picture, where a one-pass variance could cancel (measured: the tiny
    model 1.3e-6 – 5.5e-6 against 2.2e-7 – 1.3e-6 plain, a random SD v1.5 VAE 8e-6 against 2e-6)."""
    ours, _ = make_pair(THREE_WIDTHS, seed=1)
    if latents == "random":
        z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    else:
        with torch.no_grad():
            z = ours.encode(torch.tensor([0.9, -0.6, 0.2])[None, :, None, None].expand(1, 3, 64, 64)).mean
    with torch.no_grad():
        exact = ours.double().decode(z.double())
        ours.float()
        plain = rel_err(ours.decode(z).double(), exact)
        fast = rel_err(fast_cpu.enable(ours).decode(z).double(), exact)
    assert fast_cpu.enabled(ours) == ("channels_last",)       # the channels-last decode ran
    assert fast < max(10 * plain, 1e-5), (fast, plain)


def test_load_pipeline_enables_the_paths_on_cpu_unless_told_not_to():
    pipe = sdlearn.load_pipeline("tiny", device="cpu")
    assert fast_cpu.enabled(pipe.unet) == fast_cpu.PATHS and fast_cpu.enabled(pipe.vae) == ("channels_last",)
    plain = sdlearn.load_pipeline("tiny", device="cpu", fast=False)
    assert fast_cpu.enabled(plain.unet) == () and fast_cpu.enabled(plain.vae) == ()
    a = sdlearn.load_pipeline("tiny", device="cpu").generate("a red circle", seed=0, progress=False)
    b = plain.generate("a red circle", seed=0, progress=False)
    assert (a.pixels - b.pixels).abs().max() < 1e-4
