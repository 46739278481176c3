"""Training at micro scale: the stages run, resume exactly, export (several processes: test_train_ddp.py)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from sdlearn import analyser, export, runlog, shapes, train
from sdlearn.configs import ModelConfig
from sdlearn.safetensors_file import SafetensorsFile, read_safetensors_header

DATA = dict(images=32, two_shapes=0.1, seed=3)
UNET = dict(batch=4, lr=1e-3, warmup=1, log_every=1, checkpoint_every=1, eval_steps=0, captions_per_image=2, **DATA)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A micro run: 3 VAE steps, then 3 UNet steps."""
    out = tmp_path_factory.mktemp("run")
    train.train_vae(out, config="micro", steps=3, batch=4, warmup=1, log_every=1, data_cache=None, **DATA)
    train.train_unet(out, steps=3, data_cache=None, **{**UNET, "eval_steps": 1})
    return out


def _copy_vae_stage(run: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "latents.pt", "vae.pt"):
        shutil.copy(run / name, dst / name)
    return dst


def test_vae_stage_stores_the_measured_latent_scale(run):
    config = ModelConfig.from_dict(json.loads((run / "config.json").read_text()))
    latents = torch.load(run / "latents.pt")
    vae = train.load_ema_vae(run, config, torch.device("cpu"))
    images = shapes.make_dataset(DATA["images"], DATA["seed"], two_shapes=DATA["two_shapes"]).images
    mean, std = train.encode_dataset(vae, images, torch.device("cpu"))
    torch.testing.assert_close(latents["mean"], mean)           # the EMA VAE's encoding of the dataset
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(123))
    assert config.vae.scaling_factor == pytest.approx(1 / z.std().item(), rel=0.03)
    assert config.vae.scaling_factor != ModelConfig.micro().vae.scaling_factor


def test_log_records_every_step_of_both_stages(run):
    log = runlog.read_log(run)
    losses = [(r["stage"], r["step"]) for r in log if "loss" in r]
    assert losses == [("vae", 1), ("vae", 2), ("vae", 3), ("unet", 1), ("unet", 2), ("unet", 3)]
    assert all(r["loss"] > 0 and r["sec_per_step"] > 0 for r in log if "loss" in r)
    measure = next(r["measure"] for r in log if "measure" in r)
    assert 0 < measure["l1"] < 2 and measure["scaling_factor"] > 0
    assert 0 <= measure["recon_colour"] <= 1 and 0 <= measure["recon_shape"] <= 1


def test_an_existing_stage_is_only_continued_with_resume(run):
    with pytest.raises(FileExistsError, match="--resume"):
        train.train_unet(run, steps=4, data_cache=None, **UNET)


def test_resumed_run_equals_an_uninterrupted_one(run, tmp_path):
    straight = _copy_vae_stage(run, tmp_path / "straight")
    train.train_unet(straight, steps=4, data_cache=None, **UNET)
    halves = _copy_vae_stage(run, tmp_path / "halves")
    train.train_unet(halves, steps=2, data_cache=None, **UNET)
    train.train_unet(halves, steps=4, resume=True, data_cache=None)   # settings come from the checkpoint
    a, b = train.load_checkpoint(straight / "unet.pt"), train.load_checkpoint(halves / "unet.pt")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    first = train.load_checkpoint(run / "unet.pt")["model"]
    assert not all(torch.equal(first[k], a["model"][k]) for k in first)   # training did change the weights


def test_export_writes_the_ema_weights_in_the_original_layout(run, tmp_path):
    path = export.export(run, tmp_path / "micro.safetensors")
    assert path.stat().st_mode & 0o777 == 0o644
    f = SafetensorsFile(path)
    prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in f.keys())
    config = json.loads(f.metadata["sdlearn_config"])
    assert config == json.loads((run / "config.json").read_text())
    assert json.loads(f.metadata["sdlearn_defaults"]) == {"sampler": "ddim", "steps": 20}
    assert "circle" in json.loads(f.metadata["sdlearn_vocabulary"])["words"]
    stored = json.loads(f.metadata["sdlearn_preview"])
    assert len(stored["weight"]) == 3 and len(stored["bias"]) == 3 and stored["rmse"] > 0
    assert f["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4          # 1×1 conv, as CompVis stores it

    import sdlearn
    pipe = sdlearn.load_pipeline(path, device="cpu", dtype=torch.float32)
    ema = train.load_checkpoint(run / "unet.pt")["ema"]
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, ema["unet." + k]), k
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, ema["text_encoder." + k]), k
    vae_ema = train.load_checkpoint(run / "vae.pt")["ema"]
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(v, vae_ema["vae." + k]), k
    assert pipe.latent_preview.weight.tolist() == stored["weight"]     # the stored preview, not a new fit
    assert pipe.vocabulary["words"] == json.loads(f.metadata["sdlearn_vocabulary"])["words"]


def test_export_falls_back_to_float16_and_refuses_what_does_not_fit(run, tmp_path):
    fp32 = export.export(run, tmp_path / "a.safetensors").stat().st_size
    half = export.export(run, tmp_path / "b.safetensors", max_bytes=int(fp32 * 0.6))
    assert {t.dtype for t in read_safetensors_header(half).tensors.values()} == {"F16"}
    assert {t.dtype for t in read_safetensors_header(tmp_path / "a.safetensors").tensors.values()} == {"F32"}
    with pytest.raises(ValueError, match="over the"):
        export.export(run, tmp_path / "c.safetensors", max_bytes=int(fp32 * 0.3))


def test_the_unet_stage_ends_with_an_evaluation_of_the_grammar_prompts(run):
    evals = [r for r in runlog.read_log(run) if "eval" in r]
    assert [r["step"] for r in evals] == [3]
    assert set(evals[0]["eval"]) == {"7.5", "1.0"}
    for scores in evals[0]["eval"].values():
        one = {"colour", "shape", "position", "found", "stray", "circle"}          # analyser.score_alignment's
        assert set(scores) == one | {f"pair_{k}" for k in analyser.PAIR_SCORES}   # and score_pairs'
        assert all(0 <= v <= 1 for v in scores.values() if v == v)                  # (NaN: nothing to count)
    assert (run / "samples-3.png").stat().st_size > 10_000


def test_cli_exports(run, tmp_path):   # (the stages' CLI runs in test_train_ddp.py)
    assert train.main(["export", str(run), str(tmp_path / "m.safetensors"), "--dtype=float16"]) == 0
    assert {t.dtype for t in read_safetensors_header(tmp_path / "m.safetensors").tensors.values()} == {"F16"}


def test_a_run_resumed_with_other_settings_keeps_each_parts_settings_and_exports_them(run, tmp_path):
    """The shipped model's last 2,000 steps used --caption-noise 0.3: the checkpoint (and the exported
    file's metadata) say which settings each part of the run used, from which step."""
    folder = _copy_vae_stage(run, tmp_path / "parts")
    train.train_unet(folder, steps=2, data_cache=None, **UNET)
    train.train_unet(folder, steps=3, resume=True, data_cache=None)          # same settings: still one part
    assert len(train.load_checkpoint(folder / "unet.pt")["parts"]) == 1
    train.train_unet(folder, steps=4, resume=True, data_cache=None, caption_noise=0.3)
    parts = train.load_checkpoint(folder / "unet.pt")["parts"]
    assert [p["from_step"] for p in parts] == [0, 3]
    assert parts[0]["settings"]["caption_noise"] == 0.0 and parts[1]["settings"]["caption_noise"] == 0.3
    meta = json.loads(SafetensorsFile(export.export(folder, tmp_path / "parts.safetensors")).metadata["sdlearn_training"])
    assert meta["unet_steps"] == 4 and meta["unet_parts"] == parts
