"""What the CPU says it can do: vendor, model name, vector and matrix instruction sets.

The speed choices of `sdlearn.fast_cpu` and `load_pipeline(..., dtype="auto")` are made from
this report, never from one machine's name or constants: a choice measured on an AMD EPYC holds
for the CPUs that report what it reported.

    >>> from sdlearn import cpu_features
    >>> print(cpu_features.detect().summary())
    AMD EPYC (AMD) · vector: avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 · matrix: none ·
    bfloat16 products: avx512_bf16 · torch kernels: AVX512

Sources: Linux's /proc/cpuinfo (the `vendor_id`, `model name` and `flags` lines of the first
processor; ARM's `CPU implementer` and `Features`), and PyTorch's own choice of vectorised kernels
(`torch.backends.cpu.get_cpu_capability()`: "AVX512", "AVX2", "DEFAULT", …). Elsewhere (macOS,
Windows) only the model name from `platform` and torch's capability are known; no flags.

The instruction sets that matter for a diffusion model's matrix products:

    avx2, fma       8 float32 multiply-adds per instruction (every x86 CPU since 2013)
    avx512f         16 per instruction
    avx512_bf16     VDPBF16PS: 32 bfloat16 products summed into 16 float32 (Intel Cooper Lake,
                    Sapphire Rapids+; AMD Zen 4+: Zen 5 runs it on full 512-bit units)
    amx_bf16        AMX tiles: a 16×32 by 32×16 bfloat16 product per instruction (Intel Sapphire
                    Rapids and later Xeons; no AMD CPU so far). Issue 18's 2-core Xeon: a 4096²
                    product 2.5 TFLOP/s in bfloat16 against 0.42 in float32
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

# The flags reported in the summary, in the order of the generations that brought them.
VECTOR = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni")
MATRIX = ("amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "0x41": "ARM", "0x61": "Apple"}


@dataclass(frozen=True)
class CPUFeatures:
    """One CPU's report. vendor: "Intel", "AMD", "ARM", "Apple", or the raw id ("" if unknown)."""
    vendor: str
    model: str
    flags: frozenset[str]
    torch_capability: str = ""
    cores: int | None = None

    def has(self, *flags: str) -> bool:
        """Does the CPU report every one of these flags (names as in /proc/cpuinfo)?"""
        return all(f in self.flags for f in flags)

    @property
    def vector(self) -> tuple[str, ...]:
        return tuple(f for f in VECTOR if f in self.flags)

    @property
    def matrix(self) -> tuple[str, ...]:
        return tuple(f for f in MATRIX if f in self.flags)

    @property
    def bf16_products(self) -> str | None:
        """What computes bfloat16 matrix products natively: "amx_bf16" (tiles), "avx512_bf16"
        (vector dot products), or None (bfloat16 is converted to float32 and gains nothing)."""
        if self.has("amx_bf16", "amx_tile"):
            return "amx_bf16"
        if self.has("avx512_bf16"):
            return "avx512_bf16"
        return None

    def summary(self) -> str:
        """One line: model (vendor) · vector · matrix · bfloat16 products · torch kernels."""
        return (f"{self.model or 'unknown CPU'} ({self.vendor or 'unknown vendor'})"
                + (f", {self.cores} cores" if self.cores else "")
                + f" · vector: {' '.join(self.vector) or 'none reported'}"
                + f" · matrix: {' '.join(self.matrix) or 'none'}"
                + f" · bfloat16 products: {self.bf16_products or 'none (emulated)'}"
                + f" · torch kernels: {self.torch_capability or '?'}")


def parse_cpuinfo(text: str, torch_capability: str = "", cores: int | None = None) -> CPUFeatures:
    """The first processor's block of a /proc/cpuinfo text → CPUFeatures.

    Lines are `key<tabs>: value`; blocks are separated by blank lines. x86 names its flags
    `flags`, ARM `Features`."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break                                   # the end of the first processor's block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    raw_vendor = fields.get("vendor_id") or fields.get("CPU implementer", "")
    model = fields.get("model name") or fields.get("Processor") or fields.get("Hardware", "")
    flags = fields.get("flags") or fields.get("Features", "")
    return CPUFeatures(vendor=VENDORS.get(raw_vendor, raw_vendor), model=model, flags=frozenset(flags.split()),
                       torch_capability=torch_capability, cores=cores)


def torch_capability() -> str:
    """PyTorch's choice of vectorised kernels on this CPU ("AVX512", "AVX2", "DEFAULT", …)."""
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return get() if get else ""


@functools.lru_cache(maxsize=1)
def detect() -> CPUFeatures:
    """This machine's CPU (read once per process)."""
    capability, cores = torch_capability(), os.cpu_count()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read(), capability, cores)
    except OSError:                                     # not Linux: the model name only
        vendor = "Apple" if platform.system() == "Darwin" and platform.machine() == "arm64" else ""
        return CPUFeatures(vendor, platform.processor() or platform.machine(), frozenset(), capability, cores)
