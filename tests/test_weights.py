"""Checkpoint reading: the safetensors header by hand, layouts, key renaming, refusals."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import diffusers_folder, diffusers_from_original, original_file, original_state_dict
from sdlearn import checkpoint, layouts, safetensors_file
from sdlearn.configs import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig

TINY = ModelConfig.tiny()
# A second small architecture that exercises what tiny() does not: three levels, a level
# without attention, two ResBlocks per level (three on the way up), a deeper VAE block.
SMALL = ModelConfig(
    CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    UNetConfig(block_out_channels=(32, 64, 64), attention_levels=(True, True, False), layers_per_block=2,
               num_heads=2, cross_attention_dim=32, sample_size=8),
    VAEConfig(block_out_channels=(32, 64), layers_per_block=2, sample_size=32))


# ---- the header, by hand ----------------------------------------------------------------------

def test_header_matches_the_safetensors_library(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(10, dtype=torch.int64),
        "c": torch.randn(2, 2).half(),
        "d": torch.randn(5).bfloat16(),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False]),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"note": "hello"})
    header = safetensors_file.read_safetensors_header(path)
    f = safetensors_file.SafetensorsFile(path)
    with safe_open(str(path), "pt") as ref:
        assert set(header.tensors) == set(ref.keys())
        assert header.metadata == ref.metadata()
        for k in ref.keys():
            expected = ref.get_tensor(k)
            assert header.tensors[k].shape == tuple(expected.shape)
            assert torch.equal(f[k], expected) and f[k].dtype == expected.dtype


def test_memory_mapped_tensors_are_views_not_copies(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.ones(1024, 1024)}, str(path))
    f = safetensors_file.SafetensorsFile(path)
    a, b = f["w"], f["w"]
    # Both views point into the same mapped buffer: nothing was read into fresh memory.
    assert a.data_ptr() == b.data_ptr()
    a[0, 0] = 5.0                    # copy-on-write: writable, and the file is untouched
    assert safetensors_file.SafetensorsFile(path)["w"][0, 0] == 1.0


# ---- layouts and key renaming -----------------------------------------------------------------

@pytest.mark.parametrize("config", [TINY, SMALL], ids=["tiny", "small"])
def test_original_layout_renames_to_the_same_tensors_as_diffusers_conversion(config):
    """CompVis `ldm` modules give the original names; diffusers' from_single_file converts the
    same file to its layout. sdlearn's rename rules must give exactly the same tensors."""
    ckpt = checkpoint.open_checkpoint(original_file(config))
    assert ckpt.layout == "original"
    pipe = diffusers_from_original(config)
    for comp, module in [("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)]:
        reference = {("" if k.startswith("text_model.") or comp != "text_encoder" else "text_model.") + k: v
                     for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        ours = ckpt.tensors[comp]
        assert set(ours) == set(reference), comp
        for k, ref in reference.items():
            t = ours[k]()
            assert torch.equal(t.reshape(ref.shape), ref), k
    assert not ckpt.unexpected
    assert "alphas_cumprod" in ckpt.other


@pytest.mark.parametrize("config", [TINY, SMALL], ids=["tiny", "small"])
def test_rename_rules_are_a_bijection(config):
    sd = original_state_dict(config)
    for comp, prefix in layouts.PREFIX.items():
        rules = layouts.block_rules(comp, config)
        for k in sd:
            if not k.startswith(prefix) or k.endswith("position_ids"):
                continue
            ours = layouts.from_original_key(k[len(prefix):], rules)
            assert ours is not None, k
            assert prefix + layouts.to_original_key(ours, rules) == k


def test_diffusers_folder_opens_with_its_config():
    ckpt = checkpoint.open_checkpoint(diffusers_folder(TINY))
    assert ckpt.layout == "diffusers"
    assert ckpt.config == TINY
    assert ckpt.tokenizer_folder is not None
    assert all(k.startswith("text_model.") for k in ckpt.tensors["text_encoder"])
    assert not any(k.endswith("position_ids") for k in ckpt.tensors["text_encoder"])


def test_position_ids_are_never_loaded(tmp_path):
    sd = original_state_dict(TINY)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.rand(1, 77) * 76  # corrupted floats
    path = tmp_path / "merged.safetensors"
    save_file(sd, str(path))
    ckpt = checkpoint.open_checkpoint(path, config=TINY)
    assert not any("position_ids" in k for k in ckpt.tensors["text_encoder"])
    assert not ckpt.unexpected


def test_summary_counts_tensors_and_parameters():
    ckpt = checkpoint.open_checkpoint(original_file(TINY))
    s = checkpoint.summarize(ckpt)
    sd = original_state_dict(TINY)
    for comp, prefix in layouts.PREFIX.items():
        keys = [k for k in sd if k.startswith(prefix) and not k.endswith("position_ids")]
        assert s[comp]["tensors"] == len(keys)
        assert s[comp]["parameters"] == sum(sd[k].numel() for k in keys)
        assert s[comp]["bytes"] == 4 * s[comp]["parameters"]
        assert s[comp]["dtypes"] == ["F32"]


# ---- refusals: one clear line that names the file ---------------------------------------------

def _write_keys(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    return path


@pytest.mark.parametrize("keys, message", [
    ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (4, 4),
      "model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "SDXL"),
    ({"cond_stage_model.model.token_embedding.weight": (4, 4),
      "model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "SD 2.x"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "LoRA"),
    ({"encoder.down.0.block.0.conv1.weight": (4, 4), "decoder.up.0.block.0.conv1.weight": (4, 4)}, "VAE-only"),
    ({"down_blocks.0.resnets.0.conv1.weight": (4, 4)}, "one component of a diffusers folder"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, "without first_stage_model"),
    ({"something.else": (2,)}, "not an SD v1.x checkpoint"),
])
def test_other_model_families_are_named(tmp_path, keys, message):
    path = _write_keys(tmp_path / "model.safetensors", keys)
    with pytest.raises(safetensors_file.CheckpointError, match=message) as err:
        checkpoint.open_checkpoint(path)
    assert "model.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_inpainting_checkpoint_is_named(tmp_path):
    sd = original_state_dict(TINY)
    sd = {k: v for k, v in sd.items()}
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, *w.shape[2:])
    path = tmp_path / "inpaint.safetensors"
    save_file(sd, str(path))
    # A file without sdlearn metadata is taken to be SD v1.5; its conv_in shape gives it away.
    with pytest.raises(safetensors_file.CheckpointError, match="inpainting"):
        layouts.infer_original_config({k: tuple(v.shape) for k, v in sd.items()}, {}, path.name)


def _raw(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("content, message", [
    (b"", "empty or truncated"),
    (b"\x01\x02\x03", "empty or truncated"),
    (struct.pack("<Q", 10**12) + b"{}", "header length"),
    (struct.pack("<Q", 500) + b"{}", "does not fit"),
    (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "expected an object"),
    (_raw({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1000]}}, bytes(16)), "truncated"),
    (_raw({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(16)), "needs 16 bytes"),
    (_raw({"w": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)), "dtype"),
    (_raw({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)), "malformed"),
    (_raw({"w": {"dtype": "F32", "shape": [4]}}, bytes(16)), "needs dtype, shape and two data_offsets"),
    (_raw({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)), "overlap"),
    (_raw({"__metadata__": {"x": 1}}), "__metadata__"),
])
def test_broken_files_get_one_clear_line(tmp_path, content, message):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(safetensors_file.CheckpointError, match=message) as err:
        checkpoint.open_checkpoint(path)
    assert "broken.safetensors" in str(err.value)


def test_truncated_real_file(tmp_path):
    data = original_file(TINY).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(safetensors_file.CheckpointError, match="truncated"):
        checkpoint.open_checkpoint(path)


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(safetensors_file.CheckpointError, match="no such file"):
        checkpoint.open_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(safetensors_file.CheckpointError, match="unknown file type"):
        checkpoint.open_checkpoint(tmp_path / "weights.onnx")


def test_diffusers_folder_with_a_missing_component(tmp_path):
    import shutil
    folder = tmp_path / "sd"
    shutil.copytree(diffusers_folder(TINY), folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(safetensors_file.CheckpointError, match="vae/config.json"):
        checkpoint.open_checkpoint(folder)
    folder2 = tmp_path / "sd2"
    shutil.copytree(diffusers_folder(TINY), folder2)
    for f in (folder2 / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(safetensors_file.CheckpointError, match="unet/ has no weights"):
        checkpoint.open_checkpoint(folder2)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(safetensors_file.CheckpointError, match="model_index.json"):
        checkpoint.open_checkpoint(tmp_path)


# ---- pickles: weights_only, and code never runs ----------------------------------------------

class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(safetensors_file.CheckpointError, match="refused") as err:
        checkpoint.open_checkpoint(path)
    assert "evil.ckpt" in str(err.value)
    assert not marker.exists()


def test_plain_pickle_of_tensors_loads(tmp_path):
    sd = original_state_dict(TINY)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 3}, path)
    ckpt = checkpoint.open_checkpoint(path, config=TINY)
    assert ckpt.layout == "original"
    k = "model.diffusion_model.conv_in.weight"
    assert k not in ckpt.tensors["unet"]
    assert torch.equal(ckpt.tensors["unet"]["conv_in.weight"](), sd["model.diffusion_model.input_blocks.0.0.weight"])


def test_legacy_pickle_protocol_is_refused_cleanly(tmp_path):
    path = tmp_path / "old.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Payload(str(tmp_path / "pwned2"))}, f)
    with pytest.raises(safetensors_file.CheckpointError):
        checkpoint.open_checkpoint(path)
    assert not (tmp_path / "pwned2").exists()
