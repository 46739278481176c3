"""What `make bench` puts beside sdlearn and diffusers on a CPU: the CPU's report and its measured
matrix-product peak, achieved TFLOP/s, and OpenVINO as a peer (a bench-only dependency).

    peak            the best of `repeats` n×n matrix products (torch.mm) in float32 and bfloat16:
                    2n³ FLOP each; what the CPU's matrix units give one large product on the
                    threads the bench runs on
    OpenVINO        the diffusers UNet converted with `openvino.convert_model` on example inputs
                    (the same weight tensors), compiled for the CPU with INFERENCE_PRECISION_HINT
                    f32 or bf16 (its own default on CPUs with bfloat16 units is bf16), on as many
                    threads as torch
"""
from __future__ import annotations

import time

import torch

from sdlearn.cpu_features import detect


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of the fastest of `repeats` n×n products (after one untimed)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def header(peaks: dict[torch.dtype, float], n: int) -> str:
    """The lines printed above the tables: the CPU's report and its peaks."""
    cpu = detect()
    peak = ", ".join(f"{str(dt).removeprefix('torch.')} {p / 1e12:.3f} TFLOP/s" for dt, p in peaks.items())
    return f"CPU: {cpu.summary()}\nmatrix-product peak ({n}² torch.mm, best of 3, {torch.get_num_threads()} threads): {peak}"


def tflops(flops: float, seconds: list[float]) -> str:
    """Achieved TFLOP/s at the median time."""
    s = sorted(seconds)[len(seconds) // 2]
    return f"{flops / s / 1e12:.3f}"


def achieved(flops: float, ours: list[float], ref: list[float], peak: float, ref_name: str = "diffusers") -> str:
    """The note for a row: each side's TFLOP/s and sdlearn's share of the peak."""
    share = flops / sorted(ours)[len(ours) // 2] / peak
    return (f"TFLOP/s sdlearn {tflops(flops, ours)}, {ref_name} {tflops(flops, ref)} "
            f"(peak {peak / 1e12:.3f}; sdlearn {100 * share:.0f} %)")


def openvino_unet(unet, example: tuple, precision: str):
    """A callable (latents, t, context) → ε running the diffusers `unet` on OpenVINO in `precision`
    ("f32" or "bf16"), or a string saying why there is none."""
    try:
        import openvino as ov
    except ImportError:
        return "openvino is not installed (pip install openvino: a bench-only dependency)"

    class Plain(torch.nn.Module):                       # a tensor out, not diffusers' output class
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, latents, t, context):
            return self.unet(latents, t, context, return_dict=False)[0]

    try:
        with torch.no_grad():
            model = ov.convert_model(Plain(unet).eval(), example_input=example)
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    except Exception as exc:                            # noqa: BLE001  (any failure: say so, skip the row)
        return f"OpenVINO could not convert or compile the UNet: {type(exc).__name__}: {exc}"[:300]
    request = compiled.create_infer_request()

    def run(latents, t, context):
        request.infer([latents.float().numpy(), t.numpy(), context.float().numpy()])
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run
