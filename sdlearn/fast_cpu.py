"""Faster CPU inference for the UNet and the VAE decoder, switched on and off without touching
their weights.

`sdlearn/unet.py` is written with plain `nn.Linear`, `nn.Conv2d` and a two-line GEGLU, the
operations a learner reads in the paper. On a CPU, PyTorch runs some of them slowly; this module
swaps in subclasses that compute the same thing faster:

    fast_cpu.enable(pipe.unet)       # what load_pipeline(..., fast=True) does on a CPU (the default)
    fast_cpu.disable(pipe.unet)      # back to the plain layers
    fast_cpu.enabled(pipe.unet)      # which paths are on: ("channels_last", "linear", "conv", "geglu")
    fast_cpu.enable(pipe.vae)        # the VAE takes one path, channels_last (load_pipeline does this too)
    fast_cpu.disable(pipe.vae)       # its decoder back on NCHW maps: diffusers' very operations

Swapping means giving each layer a subclass as its class (`layer.__class__ = OneDNNLinear`): the
same object, the same parameters, the same state dict; only `forward` differs. No weight is
copied or re-laid out ahead of time, so nothing goes stale when the weights change. Every fast
forward steps aside for the plain one when it cannot help: autograd (training), another device
or dtype than float32 or bfloat16 on the CPU, and while `torch.compile` traces the model. The
results equal the plain layers' to float32 rounding, or bfloat16 rounding for a bfloat16 model
(tests/test_fast_cpu.py). The `channels_last` path is not a layer but a pair of hooks (the input
made channels-last, the output made NCHW again); those always apply, on any device, in training
and under `torch.compile`, where channels-last maps are as correct and, for convolutions, usually
no slower.

Which paths `load_pipeline` switches on is chosen from what the CPU reports (`choose_paths`,
sdlearn.cpu_features), not from the machine they were measured on.

What each path buys, switched on one at a time (bench/unet_ablation.py; SD v1.5 UNet, one call on
latents 2×4×64×64, float32, 2 threads on the project's 2-core AMD EPYC with AVX-512):

    path            what it does                                               UNet call  / diffusers
    (none)          plain PyTorch layers, NCHW: diffusers' own operations        7.12 s     0.94
    channels_last   feature maps stored (B, H, W, C): a transformer's tokens     7.31 s     0.96
                    view (B, H·W, C) becomes free, and so do `conv`'s patches
    linear          nn.Linear on oneDNN instead of MKL, which takes slow paths   6.11 s     0.80
                    on AMD CPUs (a 1280-wide transformer block 0.34 → 0.16 s)
    conv            3×3 convs on small maps as im2col + one matrix product on    5.29 s     0.69
                    a view of the weight (oneDNN's conv re-lays out the weight
                    on every call: 1280→1280 at 8×8 takes 11 ms instead of 49)
    geglu           GEGLU as two oneDNN products, the GELU fused into one        5.12 s     0.67
                    (first level's feed-forward 75 → 52 ms)

The VAE runs its plain layers throughout; only `channels_last` applies to it, on the decoder.
Its convolutions work on large maps (up to 512×512 × 256 channels for an SD image), where oneDNN's
convolution is fast but, given NCHW maps, first copies each input into its own blocked layout and
the output back; channels-last maps it takes as they are. Measured on the same machine, random
SD v1.5 VAE, one decode to 512×512, in scratch runs (the README's bench table is the reference
for absolute times): float32 0.86 × the NCHW time on 1 thread, 0.82 × on 2; bfloat16 0.76 × and
0.78 ×; the tiny model's decode to 64×64 0.69 ×. The rounding differs: PyTorch's channels-last
GroupNorm takes the variance in one pass (E[x²] − E[x]²), so against a float64 decode the relative
error is 2.5e-6 instead of 2.6e-7 (the tiny model's pictures; largest pixel error 1.6e-5 on the
[-1, 1] scale, a 500th of one of 255 levels; flat single-colour pictures, the case where a
one-pass variance would cancel, 1e-5 – 2e-5, for the tiny model and a random SD VAE alike: a
group's spread includes its channels' different means, which a flat picture does not remove).
Real SD v1.5 weights were not available to measure. The encoder stays NCHW, though channels-last
would make it 1.2× faster: its first GroupNorm sees the picture itself, and a channels-last
encoder failed tests/test_pipeline.py's img2img parity (final latents 7e-5 from diffusers', where
the test allows 1e-5; that file also records diffusers' own encoder, handed a picture with
channels-last strides, 9e-4 off a float64 encode).

PyTorch's oneDNN ops used here are private (`torch.ops.mkldnn._linear_pointwise`); their
arguments are spelled out where they are called.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_features import CPUFeatures, detect
from .unet import GEGLU, UNet
from .vae import AutoencoderKL

PATHS = ("channels_last", "linear", "conv", "geglu")

# A k×k convolution runs as a matrix product when its output has at most this many pixels
# (batch × height × width) per output channel. Measured on the 2-core AMD EPYC (AVX-512) this
# project uses, 1280→1280 3×3: 8×8 × batch 2 (128 pixels, 0.1 per channel) 11 ms instead of 49;
# 16×16 × 2 (512, 0.4) 38 ms instead of 68; 16×16 × 4 (1024, 0.8) about even. 640→640 at 16×16 × 2
# (512, 0.8): even; at 32×32 × 2 (3.2) 57 ms instead of 34. The tiny model's 128 channels at 8×8 × 2
# (1 per channel): 1.4× slower as a product.
MATMUL_PIXELS_PER_CHANNEL = 0.5

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  post_op: str = "none") -> torch.Tensor:
    """x Wᵀ + b on oneDNN, optionally followed by a fused elementwise op (`post_op="gelu"`: the
    exact, erf GELU). (…, in) → (…, out)."""
    # _linear_pointwise(input, weight, bias, attr, scalars, algorithm):
    #   attr       the op fused after the product: "none", "relu", "gelu", "swish", …
    #   scalars    that op's numeric arguments (none needed here)
    #   algorithm  that op's variant: for "gelu", "none" = erf GELU, "tanh" = the tanh approximation
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], "none" if post_op == "gelu" else "")


DTYPES = (torch.float32, torch.bfloat16)


def _useful(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """May a layer take its oneDNN path? CPU, float32 or bfloat16 (input and weight alike), no
    autograd graph to build, and not while `torch.compile` traces the model (its compiler makes
    its own choices for plain layers)."""
    return (AVAILABLE and x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in DTYPES
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling())


class OneDNNLinear(nn.Linear):
    """`nn.Linear` on oneDNN rather than the BLAS library. PyTorch's CPU matrix products go to
    Intel's MKL, which takes slow code paths on AMD processors; oneDNN generates its own code for
    the CPU it finds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _useful(x, self.weight):
            return super().forward(x)
        return onednn_linear(x, self.weight, self.bias)


class MatmulConv2d(nn.Conv2d):
    """`nn.Conv2d` that runs small convolutions as one matrix product on their patches (im2col).

    oneDNN's convolution first copies the weight into a blocked layout of its choosing, on every
    call. On 64×64 and 32×32 maps that copy is cheap next to the convolution; on the deep levels'
    16×16 and 8×8 maps, with 1280×1280×3×3 weights, it costs two to five times the arithmetic.
    There the convolution is written as what it is:

        cols[(b, y, x), (c, i, j)] = x_pad[b, c, s·y + i, s·x + j]      (B·H'·W', C_in·k·k)
        out = cols Wᵀ + bias        W = weight viewed as (C_out, C_in·k·k): a view, no copy

    The re-layout costs in proportion to C_out·C_in·k², the patch copy to B·H'·W'·C_in·k², so the
    product wins when the output has few pixels for its channels: B·H'·W' ≤
    MATMUL_PIXELS_PER_CHANNEL · C_out. Always for 1×1 convolutions, where cols is the
    channels-last map itself (no copy at all). Dilation, groups and padding modes other than
    zeros use the plain convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_useful(x, self.weight) and self.groups == 1 and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return super().forward(x)
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        pointwise = (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0)
        if not pointwise and b * ho * wo > MATMUL_PIXELS_PER_CHANNEL * self.out_channels:
            return super().forward(x)
        cols = x.permute(0, 2, 3, 1)                                    # (B, H, W, C): free when channels-last
        if not pointwise:
            cols = F.pad(cols, (0, 0, pw, pw, ph, ph)).unfold(1, kh, sh).unfold(2, kw, sw)  # (B, H', W', C, k, k)
        out = onednn_linear(cols.reshape(b * ho * wo, -1), self.weight.view(self.out_channels, -1), self.bias)
        return out.view(b, ho, wo, self.out_channels).permute(0, 3, 1, 2)   # (B, C_out, H', W'), channels-last


class FusedGEGLU(GEGLU):
    """GEGLU as two oneDNN products on the two halves of its weight (views, no copy), the GELU
    fused into the second one's output:  a = x W_aᵀ + b_a,  g = GELU(x W_bᵀ + b_b),  a · g.
    It saves the separate GELU pass and the copy `chunk` makes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight, self.proj.bias
        if not _useful(x, w):
            return super().forward(x)
        inner = w.shape[0] // 2
        gate = onednn_linear(x, w[inner:], b[inner:], post_op="gelu")
        return onednn_linear(x, w[:inner], b[:inner]).mul_(gate)


# -- which paths, on which CPU -------------------------------------------------------------------

# By vendor, from cpu_features: the measurements behind each choice.
#   AMD    every path: bench/unet_ablation.py on the 2-core EPYC (Zen 5), float32, table above;
#          in bfloat16 (AVX512_BF16) the paths took an SD v1.5 UNet call at 32×32 latents from
#          1.82 s to 1.50 s (1 thread, README: CPU). channels_last also on the VAE decoder:
#          0.82–0.86 × (float32), 0.76–0.78 × (bfloat16), module docstring.
#   Intel  every path: the one configuration measured on a 2-core Xeon with AMX (issue 18:
#          0.90 × diffusers in float32); no path has been measured alone there yet, nor the
#          VAE decoder's channels_last (oneDNN's own advice for its convolutions). MKL, not
#          slow on Intel, makes `linear` the first to re-measure (bench/unet_ablation.py).
PATHS_BY_VENDOR = {"AMD": PATHS, "Intel": PATHS}


def choose_paths(cpu: CPUFeatures | None = None) -> tuple[str, ...]:
    """The speed paths for a CPU (default: this one): its vendor's row of PATHS_BY_VENDOR; every
    path elsewhere (each is equal to the plain layer, so an unmeasured CPU loses no accuracy);
    none without PyTorch's oneDNN ops."""
    if not AVAILABLE:
        return ()
    cpu = cpu or detect()
    return PATHS_BY_VENDOR.get(cpu.vendor, PATHS)


# -- the switch ----------------------------------------------------------------------------------

_SWAPS = {"linear": (nn.Linear, OneDNNLinear), "conv": (nn.Conv2d, MatmulConv2d), "geglu": (GEGLU, FusedGEGLU)}


def _to_channels_last(module, args):
    """Forward pre-hook: the input maps in channels-last memory; every convolution keeps the format
    of its input, so setting it once on the model's input is enough."""
    maps, *rest = args
    return (maps.contiguous(memory_format=torch.channels_last), *rest)


def _to_contiguous(module, args, output):
    """Forward hook: hand back the output (ε, or the VAE's images and moments) in the ordinary
    (NCHW) memory format."""
    return output.contiguous()


def enable(model: UNet | AutoencoderKL, paths: tuple[str, ...] | list[str] = PATHS) -> UNet | AutoencoderKL:
    """Switch the given speed paths on (all by default); returns the same model. On sdlearn's VAE
    (`AutoencoderKL`) only `channels_last` applies, to its decoder; the other paths are the UNet's
    and leave the VAE as it is."""
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ValueError(f"unknown speed path(s) {unknown}; expected some of {', '.join(PATHS)}")
    if not isinstance(model, (UNet, AutoencoderKL)):
        raise TypeError(f"fast_cpu works on sdlearn's UNet and VAE (AutoencoderKL); got {type(model).__name__}")
    disable(model)
    if isinstance(model, AutoencoderKL):
        parts = (model.decoder,) if "channels_last" in paths else ()     # not the encoder: see above
        model._fast_cpu_hooks = {
            "channels_last": [part.register_forward_pre_hook(_to_channels_last) for part in parts],
            "contiguous": [part.register_forward_hook(_to_contiguous) for part in parts]}
        return model
    for module in model.modules():
        for path in paths:
            plain, fast = _SWAPS.get(path, (None, None))
            if plain is not None and type(module) is plain:
                module.__class__ = fast
    hooks = {"contiguous": [model.register_forward_hook(_to_contiguous)]}   # `conv` answers channels-last too
    if "channels_last" in paths:
        hooks["channels_last"] = [model.register_forward_pre_hook(_to_channels_last)]
    model._fast_cpu_hooks = hooks
    return model


def disable(model: UNet | AutoencoderKL) -> UNet | AutoencoderKL:
    """Back to the plain PyTorch layers; returns the same model."""
    for module in model.modules():
        for plain, fast in _SWAPS.values():
            if type(module) is fast:
                module.__class__ = plain
    for handles in getattr(model, "_fast_cpu_hooks", {}).values():
        for handle in handles:
            handle.remove()
    model._fast_cpu_hooks = {}
    return model


def enabled(model: UNet | AutoencoderKL) -> tuple[str, ...]:
    """The speed paths now switched on, in the order of PATHS."""
    on = {path for path, (_, fast) in _SWAPS.items() if any(type(m) is fast for m in model.modules())}
    if getattr(model, "_fast_cpu_hooks", {}).get("channels_last"):
        on.add("channels_last")
    return tuple(p for p in PATHS if p in on)
