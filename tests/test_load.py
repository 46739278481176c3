"""load_pipeline: both layouts give the same model, casting as read, no second copy, sources."""
from __future__ import annotations

import sys

import pytest
import torch

import sdlearn
from checkpoints import diffusers_from_original, original_file
from reference import cache_dir
from sdlearn import sources
from sdlearn.checkpoint import COMPONENTS
from sdlearn.configs import ModelConfig
from sdlearn.safetensors_file import CheckpointError

TINY = ModelConfig.tiny()


def _same_weights(a, b) -> bool:
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.fixture(scope="module")
def converted_folder():
    """The original file's weights, converted by diffusers and saved as a diffusers folder."""
    from checkpoints import _name
    folder = cache_dir("checkpoints", _name(TINY, 0), "converted")
    if not (folder / "model_index.json").exists():
        diffusers_from_original(TINY).save_pretrained(folder)
    return folder


def test_both_layouts_load_to_identical_models(converted_folder):
    a = sdlearn.load_pipeline(str(original_file(TINY)), device="cpu")
    b = sdlearn.load_pipeline(str(converted_folder), device="cpu")
    assert a.config == b.config == TINY
    for comp in COMPONENTS:
        assert _same_weights(getattr(a, comp), getattr(b, comp)), comp
    ids = a.tokenizer("a red circle on the left")
    assert torch.equal(ids, b.tokenizer("a red circle on the left"))
    assert torch.equal(a.text_encoder(ids), b.text_encoder(ids))


def test_float16_file_is_cast_as_it_is_read():
    full = sdlearn.load_pipeline(str(original_file(TINY)), device="cpu")
    half = sdlearn.load_pipeline(str(original_file(TINY, dtype=torch.float16)), device="cpu")
    assert half.dtype == torch.float32
    for comp in COMPONENTS:
        for k, v in getattr(half, comp).state_dict().items():
            assert v.dtype == torch.float32
            assert torch.equal(v, getattr(full, comp).state_dict()[k].half().float()), k
    as_half = sdlearn.load_pipeline(str(original_file(TINY)), device="cpu", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in as_half.unet.parameters())


def _rss_mb(field: str = "RssAnon") -> float:
    """RssAnon: memory this process owns. RssFile: pages of mapped files it has touched (shared
    page cache, not copies)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    pytest.skip(f"no {field} in /proc/self/status on this OS")


def test_loading_in_the_stored_dtype_copies_nothing():
    path = original_file(TINY)
    sdlearn.load_pipeline(str(path), device="cpu")          # imports and caches warmed up
    size_mb = path.stat().st_size / 2**20
    before = _rss_mb()
    pipe = sdlearn.load_pipeline(str(path), device="cpu")
    grown = _rss_mb() - before
    # The weights are views of the memory-mapped file: loading copies (almost) none of them.
    assert grown < 0.25 * size_mb, f"anonymous RSS grew {grown:.1f} MB loading a {size_mb:.1f} MB file"
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_loading_leaves_the_file_pages_unread_until_used():
    """The NaN/inf check reads the file with ordinary reads, not through the map: after loading,
    (almost) none of the file's pages are resident in this process; a forward pass maps in what it
    uses. (Mapping every page at load made peak RSS exceed diffusers', which maps lazily.)"""
    path = original_file(TINY)
    sdlearn.load_pipeline(str(path), device="cpu")
    size_mb = path.stat().st_size / 2**20
    before = _rss_mb("RssFile")
    pipe = sdlearn.load_pipeline(str(path), device="cpu")
    grown = _rss_mb("RssFile") - before
    assert grown < 0.25 * size_mb, f"file-backed RSS grew {grown:.1f} MB loading a {size_mb:.1f} MB file"
    with torch.no_grad():
        pipe.text_encoder(pipe.tokenizer(["a red circle"]))
        pipe.unet(torch.zeros(1, 4, 8, 8), torch.tensor([10]), torch.zeros(1, 77, pipe.config.unet.cross_attention_dim))
    assert _rss_mb("RssFile") - before > 0.25 * size_mb         # the forward passes did read the weights


def test_meta_device_build_has_no_storage():
    from sdlearn.checkpoint import build_empty
    unet = build_empty("unet", ModelConfig.sd15())
    assert all(p.is_meta for p in unet.parameters())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="floating torch.dtype"):
        sdlearn.load_pipeline(str(original_file(TINY)), device="cpu", dtype=torch.int8)


def test_missing_tiny_file_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "TINY_PATH", tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="not in this installation"):
        sdlearn.load_pipeline("tiny")


@pytest.mark.parametrize("source", ["no/such/file.safetensors", "./missing", "nothing-here.ckpt"])
def test_paths_that_do_not_exist_are_never_treated_as_repo_ids(source):
    with pytest.raises(CheckpointError, match="no such file"):
        sources.resolve_source(source)


# ---- Hugging Face repo ids: cache first, HF_HUB_OFFLINE respected, never fetched otherwise ----

def _fake_hub_cache(root, repo_id: str, folder) -> None:
    """Lay out `folder` as huggingface_hub's cache would hold a snapshot of `repo_id`."""
    import shutil
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_repo_id_loads_from_the_cache_offline(monkeypatch, tmp_path, converted_folder):
    constants = pytest.importorskip("huggingface_hub.constants")   # a submodule: import it by name
    _fake_hub_cache(tmp_path, "someone/tiny-sd", converted_folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = sdlearn.load_pipeline("someone/tiny-sd", device="cpu")
    ref = sdlearn.load_pipeline(str(converted_folder), device="cpu")
    assert _same_weights(pipe.unet, ref.unet)


def test_repo_id_not_in_cache_while_offline_fails_clearly(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")   # a submodule: import it by name
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        sdlearn.load_pipeline("someone/not-cached")


def test_repo_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        sources.resolve_source("someone/model")
