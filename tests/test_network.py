"""Nothing is fetched unless the user passes a Hugging Face repo id.

A local file, a diffusers folder and "tiny" load and generate with the hub's download functions
and every socket made to fail; a fresh process doing the same opens no socket at all (an audit
hook watches) and never imports huggingface_hub. A repo id looks in the cache first; with
HF_HUB_OFFLINE=1 it never goes further. (test_load.py checks a real cached snapshot offline.)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import sdlearn
from checkpoints import diffusers_folder, original_file
from sdlearn import sources
from sdlearn.cli import info
from sdlearn.configs import ModelConfig
from sdlearn.safetensors_file import CheckpointError

TINY = ModelConfig.tiny()
REPO = Path(__file__).resolve().parents[1]


class Fetched(AssertionError):
    pass


def _refuse(*args, **kwargs):
    raise Fetched(f"network use: {args[:2]!r} {kwargs!r}")


@pytest.fixture
def no_network(monkeypatch):
    """Every way out fails loudly: the hub's downloaders, DNS, socket connections."""
    hub = pytest.importorskip("huggingface_hub")
    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(hub, name, _refuse)
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)


def test_local_sources_load_and_generate_with_the_network_cut(no_network, monkeypatch):
    file, folder = original_file(TINY), diffusers_folder(TINY)
    monkeypatch.setattr(sources, "TINY_PATH", file)         # "tiny" as installed: a file in the package
    monkeypatch.chdir(folder.parent.parent)
    looks_like_a_repo_id = f"{folder.parent.name}/{folder.name}"   # "owner/name", but a folder here wins
    for source in (str(file), file, str(folder), looks_like_a_repo_id, "tiny"):
        pipe = sdlearn.load_pipeline(source, device="cpu")
        assert pipe.generate("a red circle", steps=1, sampler="ddim", seed=0, progress=False).pixels.shape == (1, 3, 64, 64)
    assert "text_encoder" in info(str(file))


def test_a_path_that_does_not_exist_is_an_error_not_a_download(no_network):
    for source in ("weights/model.safetensors", "./sd", "~/sd15", "/no/such/folder", "model.ckpt"):
        with pytest.raises(CheckpointError, match="no such file"):
            sdlearn.load_pipeline(source)


def test_a_fresh_process_loading_a_file_opens_no_socket_and_imports_no_hub_client(tmp_path):
    code = f"""
import json, sys
events = []
sys.addaudithook(lambda event, args: events.append(event) if event.startswith("socket.") else None)
import sdlearn
pipe = sdlearn.load_pipeline({str(original_file(TINY))!r}, device="cpu")
pipe.generate("a red circle", steps=1, sampler="ddim", seed=0, progress=False)
clients = sorted(m for m in ("huggingface_hub", "requests", "httpx", "urllib3", "diffusers", "transformers")
                 if m in sys.modules)
print(json.dumps({{"socket_events": sorted(set(events)), "clients": clients}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SDLEARN_DEVICE": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"socket_events": [], "clients": []}


@pytest.mark.parametrize("offline", [False, True])
def test_a_repo_id_looks_in_the_cache_first_and_offline_goes_no_further(monkeypatch, offline):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        calls.append(local_files_only)
        raise FileNotFoundError("not in the cache") if local_files_only else OSError("no network here")

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError) as err:
        sdlearn.load_pipeline("someone/some-model")
    assert "\n" not in str(err.value) and "someone/some-model" in str(err.value)
    if offline:
        assert calls == [True]
        assert "HF_HUB_OFFLINE is set" in str(err.value)
    else:
        assert calls == [True, False]                  # the cache, then (a repo id was asked for) the hub
        assert "could not be fetched from the Hugging Face hub (OSError: no network here)" in str(err.value)
