"""sdlearn.cpu_features reads what a CPU reports: two /proc/cpuinfo texts (tests/fixtures/cpuinfo: this
project's 2-core AMD EPYC, Zen 5 (family 26), copied verbatim; an Intel Xeon Platinum 8481C, Sapphire
Rapids, written with the fields and flags such a machine reports), and this machine's."""
from __future__ import annotations

from pathlib import Path

import torch

from sdlearn import cpu_features
from sdlearn.cpu_features import CPUFeatures, parse_cpuinfo

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cpuinfo"


def fixture(name: str) -> CPUFeatures:
    return parse_cpuinfo((FIXTURES / name).read_text(), torch_capability="AVX512", cores=2)


def test_amd_epyc_has_avx512_bf16_and_no_amx():
    cpu = fixture("amd_epyc.txt")
    assert (cpu.vendor, cpu.model) == ("AMD", "AMD EPYC")
    assert cpu.has("avx2", "avx512f", "avx512_bf16", "avx512_vnni") and not cpu.has("amx_bf16")
    assert cpu.matrix == () and cpu.bf16_products == "avx512_bf16"
    assert cpu.vector == ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni")


def test_sapphire_rapids_has_amx():
    cpu = fixture("intel_xeon_sapphire_rapids.txt")
    assert cpu.vendor == "Intel" and cpu.model.startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert cpu.matrix == ("amx_tile", "amx_bf16", "amx_int8")
    assert cpu.bf16_products == "amx_bf16"
    assert "avx512_fp16" in cpu.vector


def test_only_the_first_processor_block_is_read():
    amd = (FIXTURES / "amd_epyc.txt").read_text()
    intel = (FIXTURES / "intel_xeon_sapphire_rapids.txt").read_text()
    assert parse_cpuinfo(amd + intel).vendor == "AMD"
    assert parse_cpuinfo("\n\n" + intel + amd).vendor == "Intel"      # leading blank lines are not a block


def test_older_and_foreign_cpus():
    haswell = parse_cpuinfo("vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU E5-2680 v3\n"
                            "flags\t\t: sse4_2 avx fma avx2\n")
    assert haswell.vector == ("avx2", "fma") and haswell.bf16_products is None
    arm = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd bf16 sve\nCPU implementer\t: 0x41\n")
    assert arm.vendor == "ARM" and arm.has("bf16") and arm.bf16_products is None
    assert parse_cpuinfo("").vendor == "" and parse_cpuinfo("").flags == frozenset()


def test_summary_is_one_line_naming_the_extensions():
    line = fixture("intel_xeon_sapphire_rapids.txt").summary()
    assert "\n" not in line
    for part in ("Intel", "8481C", "avx512f", "amx_bf16", "bfloat16 products: amx_bf16", "torch kernels: AVX512"):
        assert part in line, line
    assert "matrix: none" in fixture("amd_epyc.txt").summary()


def test_detect_reads_this_machine():
    cpu = cpu_features.detect()
    assert cpu is cpu_features.detect()                                 # read once
    assert cpu.torch_capability == torch.backends.cpu.get_cpu_capability()
    assert cpu.model and cpu.summary()
    if Path("/proc/cpuinfo").exists() and cpu.vendor in ("Intel", "AMD"):
        assert cpu.has("sse2")                                           # every x86-64 CPU
