"""Where a pipeline comes from and how its checkpoint wants to be run: a diffusers folder's
scheduler config decides the noise schedule and the default sampler."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from checkpoints import diffusers_folder, diffusers_pipeline
from reference import rel_err
from sdlearn import sources
from sdlearn.configs import ModelConfig
from sdlearn.pipeline import load_pipeline
from sdlearn.safetensors_file import CheckpointError
from sdlearn.schedule import NoiseSchedule

TINY = ModelConfig.tiny()


@pytest.fixture
def folder(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(diffusers_folder(TINY), dst)
    return dst


def set_scheduler(folder, **changes):
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return config


def test_sd15_scheduler_config_gives_pndm_and_sd_schedule(folder):
    pipe = load_pipeline(folder, "cpu")
    assert (pipe.default_sampler, pipe.default_steps) == ("pndm", 50)       # PNDMScheduler, the SD v1.5 repo's
    assert torch.equal(pipe.schedule.alphas_cumprod, NoiseSchedule.scaled_linear().alphas_cumprod)
    assert pipe.defaults["steps_offset"] == 1


@pytest.mark.parametrize("cls, sampler", list(sources.SCHEDULER_CLASSES.items()))
def test_the_scheduler_class_names_the_default_sampler(folder, cls, sampler):
    set_scheduler(folder, _class_name=cls)
    assert load_pipeline(folder, "cpu").default_sampler == sampler


def test_clipping_x0_is_not_implemented_and_says_so(folder):
    set_scheduler(folder, _class_name="DDIMScheduler", clip_sample=True)
    with pytest.warns(UserWarning, match="never clip"):
        load_pipeline(folder, "cpu")


def test_an_unknown_scheduler_class_warns_and_keeps_sd15s_sampler(folder):
    set_scheduler(folder, _class_name="LMSDiscreteScheduler")
    with pytest.warns(UserWarning, match="LMSDiscreteScheduler.* has no sdlearn sampler"):
        assert load_pipeline(folder, "cpu").default_sampler == "pndm"


@pytest.mark.parametrize("changes, match", [
    (dict(beta_schedule="sigmoid"), "beta_schedule 'sigmoid' is not implemented"),
    (dict(trained_betas=[0.1] * 1000), "trained_betas"),
    (dict(prediction_type="v_prediction"), "v-prediction"),
])
def test_a_schedule_sdlearn_does_not_implement_is_refused(folder, changes, match):
    set_scheduler(folder, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_pipeline(folder, "cpu")


def test_another_beta_schedule_is_used_and_matches_diffusers(folder):
    """A folder whose scheduler is DDIM on DDPM's linear betas: sdlearn samples with that
    schedule (and sampler, by default) and gives diffusers' picture."""
    from diffusers import DDIMScheduler

    config = set_scheduler(folder, _class_name="DDIMScheduler", beta_schedule="linear", beta_start=0.0001,
                           beta_end=0.02, clip_sample=False)
    ours = load_pipeline(folder, "cpu", torch.float32)
    assert ours.default_sampler == "ddim"
    assert torch.equal(ours.schedule.betas, NoiseSchedule.linear().betas)
    ref = diffusers_pipeline(TINY)
    ref.tokenizer.model_max_length = 77
    ref.scheduler = DDIMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    ref.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    want = ref("a red circle", num_inference_steps=4, latents=noise, output_type="latent").images
    got = ours.generate("a red circle", steps=4, latents=noise, progress=False)
    assert rel_err(got.latents, want) <= 1e-5


def test_metadata_defaults_when_there_is_no_scheduler_config():
    assert sources.metadata_defaults({}) == {}
    assert sources.metadata_defaults({"sdlearn_defaults": '{"sampler": "ddim", "steps": 20}'}) == \
        {"sampler": "ddim", "steps": 20}
    with pytest.raises(CheckpointError, match="not JSON"):
        sources.metadata_defaults({"sdlearn_defaults": "{"})
