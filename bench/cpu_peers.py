"""What `make bench` puts beside sdlearn and diffusers on a CPU: the CPU's report and its measured
matrix-product peak, achieved TFLOP/s, and OpenVINO as a peer (a bench-only dependency).

    peak            the best of `repeats` n×n matrix products (torch.mm and oneDNN's) in float32
                    and bfloat16: 2n³ FLOP each; what the CPU's matrix units give one large
                    product on the threads the bench runs on
    OpenVINO        the diffusers UNet converted with `openvino.convert_model` on example inputs
                    (the same weight tensors), compiled for the CPU with INFERENCE_PRECISION_HINT
                    f32 or bf16 (its own default on CPUs with bfloat16 units is bf16), on as many
                    threads as torch
"""
from __future__ import annotations

import time

import torch

from sdlearn import fast_cpu
from sdlearn.cpu_features import detect


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of the fastest n×n product: `repeats` timed calls (after one untimed) of each library
    PyTorch offers for it, torch.mm (MKL for float32: slow paths on AMD CPUs) and oneDNN's linear
    (what sdlearn.fast_cpu uses)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    products = [lambda: torch.mm(a, b)]
    if fast_cpu.AVAILABLE:
        products.append(lambda: fast_cpu.onednn_linear(a, b, None))       # a bᵀ: the same work
    best = float("inf")
    for product in products:
        product()
        for _ in range(repeats):
            t0 = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def header(peaks: dict[torch.dtype, float], n: int) -> str:
    """The lines printed above the tables: the CPU's report and its peaks."""
    cpu = detect()
    peak = ", ".join(f"{str(dt).removeprefix('torch.')} {p / 1e12:.3f} TFLOP/s" for dt, p in peaks.items())
    return f"CPU: {cpu.summary()}\nmatrix-product peak ({n}² products, best of torch.mm and oneDNN, 3 each, {torch.get_num_threads()} threads): {peak}"


def tflops(flops: float, seconds: list[float]) -> str:
    """Achieved TFLOP/s at the median time."""
    s = sorted(seconds)[len(seconds) // 2]
    return f"{flops / s / 1e12:.3f}"


def achieved(flops: float, ours: list[float], ref: list[float], peak: float, ref_name: str = "diffusers") -> str:
    """The note for a row: each side's TFLOP/s and sdlearn's share of the peak."""
    share = flops / sorted(ours)[len(ours) // 2] / peak
    return (f"TFLOP/s sdlearn {tflops(flops, ours)}, {ref_name} {tflops(flops, ref)} "
            f"(peak {peak / 1e12:.3f}; sdlearn {100 * share:.0f} %)")


class _UNetTensor(torch.nn.Module):
    """diffusers' UNet returning a tensor, not its output class (what a converter can trace)."""
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, latents, t, context):
        return self.unet(latents, t, context, return_dict=False)[0]


class _Decoder(torch.nn.Module):
    """diffusers' VAE decode as a module: z → pixels in [-1, 1]."""
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


def openvino_unet(unet, example: tuple, precision: str):
    """A callable (latents, t, context) → ε running the diffusers `unet` on OpenVINO in `precision`
    ("f32" or "bf16"), or a string saying why there is none."""
    return openvino_compile(_UNetTensor(unet), example, precision)


def openvino_decoder(vae, example: torch.Tensor, precision: str):
    """A callable z → pixels running the diffusers VAE's decode on OpenVINO, or why there is none."""
    return openvino_compile(_Decoder(vae), (example,), precision)


def openvino_compile(module: torch.nn.Module, example: tuple, precision: str):
    """`module` converted by openvino.convert_model on `example` (float32 inputs) and compiled for
    the CPU in `precision` on torch's thread count: a callable on tensors, or a string saying why
    there is none (openvino missing, or the conversion failed)."""
    try:
        import openvino as ov
    except ImportError:
        return "openvino is not installed (pip install openvino: a bench-only dependency)"
    try:
        with torch.no_grad():
            model = ov.convert_model(module.eval(), example_input=example)
        # ENABLE_CPU_PINNING off: pinned, OpenVINO's inference thread can be the caller's own, left
        # pinned to one core for the torch calls that alternate with it
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                          "ENABLE_CPU_PINNING": False})
    except Exception as exc:                            # noqa: BLE001  (any failure: say so, skip the row)
        return f"OpenVINO could not convert or compile it: {type(exc).__name__}: {exc}"[:300]
    request = compiled.create_infer_request()

    def run(*inputs):
        request.infer([x.float().numpy() if x.is_floating_point() else x.numpy() for x in inputs])
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run
