import pytest
import torch

import sdlearn
from sdlearn import device


def test_env_var_overrides_device(monkeypatch):
    monkeypatch.setenv("SDLEARN_DEVICE", "cpu")
    assert device.default_device() == torch.device("cpu")


def test_cpu_defaults_to_float32(monkeypatch):
    monkeypatch.setenv("SDLEARN_DEVICE", "cpu")
    assert device.default_dtype() == torch.float32


def test_unavailable_cuda_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("SDLEARN_DEVICE", "cuda")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        device.default_device()


def test_nonsense_device_name_is_a_clear_error():
    with pytest.raises(ValueError, match="not a device name"):
        device.resolve_device("gpu-please")


def test_seed_everything_gives_reproducible_generator():
    g1 = device.seed_everything(123)
    a = torch.randn(4, generator=g1)
    b = torch.randn(4, generator=device.seed_everything(123))
    assert torch.equal(a, b)
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(123)))


def test_default_source_reads_env(monkeypatch):
    monkeypatch.delenv("SDLEARN_WEIGHTS", raising=False)
    assert sdlearn.default_source() == "tiny"
    monkeypatch.setenv("SDLEARN_WEIGHTS", "/some/model.safetensors")
    assert sdlearn.default_source() == "/some/model.safetensors"
