"""The outline style (shapes.draw(style="outline"), analyser.hollowness), training a LoRA on the
tiny model (sdlearn/lora_train.py), and the shipped outline LoRA: loaded by diffusers too, and
it outlines the shapes it draws."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sdlearn
from checkpoints import diffusers_pipeline
from reference import rel_err
from sdlearn import analyser, lora, lora_train, shapes
from sdlearn.sources import resolve_source


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py

OUTLINE_LORA = resolve_source("tiny").parent / "lora_outline.safetensors"
RECORD = OUTLINE_LORA.with_suffix(".json")            # lora_train.evaluate's record of it


@pytest.fixture(scope="module")
def pipe():
    return sdlearn.load_pipeline("tiny", device="cpu")


def test_outline_style_draws_the_same_shape_hollow_in_the_same_place():
    share = []
    for i in range(20):
        s = shapes.sample(4, i, two_shapes=0.3)
        a = s.attributes
        filled = shapes.draw(a["shapes"], a["background"])
        outline = shapes.draw(a["shapes"], a["background"], style="outline")
        assert np.array_equal(filled, s.image)                          # the default is unchanged
        bg = np.array(shapes.BACKGROUNDS[a["background"]])
        painted = lambda im: np.abs(im.astype(int) - bg).sum(-1) > 30
        assert (painted(outline) & ~painted(filled)).sum() <= 2          # inside the filled shape only
        assert painted(outline).sum() < 0.9 * painted(filled).sum()      # and not all of it
        share.append(painted(outline).sum() / painted(filled).sum())
        assert analyser.analyse(outline)["position"] == a["shapes"][0]["position"] or len(a["shapes"]) == 2
    assert np.mean(share) < 0.7
    with pytest.raises(ValueError, match="outline"):
        shapes.draw([], "white", style="dotted")


def test_hollowness_tells_outlines_from_filled_shapes():
    samples = [shapes.sample(9, i) for i in range(60)]
    filled = [analyser.hollowness(s.image) for s in samples]
    outlines = [analyser.hollowness(shapes.draw(s.attributes["shapes"], s.attributes["background"], style="outline"))
                for s in samples]
    assert max(filled) < 0.05 and min(outlines) > analyser.OUTLINED
    assert analyser.hollowness(np.full((64, 64, 3), 200, np.uint8)) is None and not analyser.outlined(
        np.full((64, 64, 3), 200, np.uint8))


def test_a_fresh_lora_is_the_model_itself_and_only_its_factors_learn(pipe):
    layers = lora_train.init_layers(pipe.unet, rank=2)
    assert {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.proj_in",
            "up_blocks.1.resnets.0.conv2"} <= set(layers) and not any("time_emb" in n or "ff." in n for n in layers)
    fused = lora_train.fused_weights(pipe.unet, layers)
    # up = 0, so ΔW = 0 exactly and W + 0 = W: equal by construction, on any CPU
    assert all(torch.equal(w, pipe.unet.get_submodule(k.removesuffix(".weight")).weight) for k, w in fused.items())
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    z0, context = torch.randn(2, 4, 8, 8), pipe.encode_prompts(["a red circle", "a blue square"]).detach()
    loss = lora_train.training_step(pipe.unet, layers, z0, context, lora_train.NoiseSchedule.scaled_linear(),
                                    torch.Generator().manual_seed(0))
    loss.backward()
    assert all(l.up.grad is not None and l.up.grad.abs().sum() > 0 for l in layers.values())
    assert all(torch.equal(v, before[k]) and not v.requires_grad for k, v in pipe.unet.state_dict().items())


def test_training_lowers_the_loss(pipe):
    layers, log = lora_train.train(pipe, images=32, steps=40, batch=8, rank=2, log_every=0)
    first, last = np.mean(log["losses"][:10]), np.mean(log["losses"][-10:])
    assert set(c for c, _ in layers) == {"unet"} and log["steps"] == 40
    assert last < first, (first, last)


# ---- the shipped outline LoRA --------------------------------------------------------------------

needs_file = pytest.mark.skipif(not OUTLINE_LORA.exists(), reason="the outline LoRA is not in this checkout")


@needs_file
def test_shipped_outline_lora_is_small_and_in_the_kohya_format():
    assert OUTLINE_LORA.stat().st_size < 1_000_000
    f = lora.read(OUTLINE_LORA)
    assert f.format == "kohya" and all(k.startswith("lora_unet_") for k in f.layers)


@needs_file
def test_diffusers_loads_the_shipped_lora_and_agrees(pipe):
    """A diffusers pipeline holding the tiny model's weights, the LoRA loaded by its own loader."""
    ref = diffusers_pipeline(pipe.config)
    ref.unet.load_state_dict(pipe.unet.state_dict(), strict=True)
    ref.text_encoder.load_state_dict({k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()},
                                     strict=False)
    ref.load_lora_weights(str(OUTLINE_LORA), adapter_name="outline")
    ref.set_adapters(["outline"], [0.8])
    context = pipe.encode_prompts(["a red circle on the left", "a small blue square at the top"])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 600])
    with torch.no_grad():
        plain = pipe.unet(x, t, context)
        pipe.load_lora(OUTLINE_LORA, scale=0.8)
        try:
            ours = pipe.unet(x, t, context)
        finally:
            pipe.unload_lora()
        theirs = ref.unet(x, t, encoder_hidden_states=context).sample
    assert rel_err(ours, theirs) < 1e-4 and rel_err(plain, theirs) > 1e-2


@needs_file
def test_shipped_lora_outlines_shapes_and_keeps_colour_and_position(pipe):
    prompts = shapes.grammar_prompts()[1::4]           # 27 prompts: every colour, shape and position
    without = lora_train.outline_scores(pipe, prompts, seed=1)
    pipe.load_lora(OUTLINE_LORA)
    try:
        with_lora = lora_train.outline_scores(pipe, prompts, seed=1)
    finally:
        pipe.unload_lora()
    assert without["outlined"] <= 0.1 and with_lora["outlined"] >= 0.5, (without, with_lora)
    assert with_lora["position"] >= without["position"] - 0.15 and with_lora["colour"] >= without["colour"] - 0.25


@needs_file
def test_float16_weights_fuse_once_and_come_back_exactly(pipe):
    """The same LoRA on a float16 pipeline (weights cast, so no longer views of the file): within
    float16 rounding of float32, and unload restores the kept originals (exact by construction)."""
    half = sdlearn.load_pipeline("tiny", device="cpu", dtype=torch.float16)
    before = {k: v.clone() for k, v in half.unet.state_dict().items()}
    context = pipe.encode_prompts(["a red circle on the left"])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    for p in (pipe, half):
        p.load_lora(OUTLINE_LORA)
    try:
        with torch.no_grad():
            full, low = pipe.unet(x, t, context), half.unet(x.half(), t, context.half()).float()
    finally:
        pipe.unload_lora()
    assert rel_err(low, full) < 3e-3 and half.unet.get_submodule("mid_block.attentions.0.proj_in").weight.dtype == torch.float16
    half.unload_lora()
    assert all(torch.equal(v, before[k]) for k, v in half.unet.state_dict().items())


@needs_file
def test_the_record_is_of_the_shipped_file_and_the_docstrings_quote_it():
    """sdlearn/data/lora_outline.json (written by `python -m sdlearn.lora_train … --evaluate`): its training
    part is the file's metadata, its sweep outlines nothing at scale 0 and most at scale 1, the VAE's
    ceiling is a share below the pictures as drawn."""
    record = json.loads(RECORD.read_text())
    metadata = lora.read(OUTLINE_LORA).metadata
    assert record["file"] == OUTLINE_LORA.name and record["training"] == lora_train.training_record(metadata)
    assert record["training"]["settings"] == {"images": 400, "steps": 600, "batch": 16, "rank": 4, "lr": 3e-3, "seed": 0,
                                              "targets": lora_train.TARGETS}
    assert list(record["sweep"]) == ["0", "0.5", "1", "1.5"] and record["evaluation"]["prompts"] == 108
    assert record["sweep"]["0"]["outlined"] == 0 and record["sweep"]["1"]["outlined"] >= 0.5, record["sweep"]
    ceiling = record["vae_ceiling"]
    assert 0 < ceiling["through_vae"] < ceiling["drawn"] <= 1
    seconds = f"{record['training']['seconds']:.0f} s"
    assert seconds in lora_train.__doc__ and "minutes" not in lora_train.__doc__, seconds
    assert f"{record['sweep']['1']['outlined']:.0%}".replace("%", " %") in lora_train.__doc__


@needs_file
def test_the_shipped_lora_outlines_most_of_eight_prompts_where_the_model_outlines_none(pipe):
    """8 prompts (6 colours, 3 shapes, with and without positions), guidance 5: none outlined without the LoRA, at
    least 4 with it. The model outlines 0 of 108 prompts without it, so 4 of 8 cannot come by chance."""
    prompts = shapes.grammar_prompts()[::14][:8]
    assert len({p["colour"] for p in prompts}) >= 4 and len({p["shape"] for p in prompts}) == 3
    without = lora_train.outline_scores(pipe, prompts, seed=0)["outlined"]
    pipe.load_lora(OUTLINE_LORA)
    try:
        with_lora = lora_train.outline_scores(pipe, prompts, seed=0)["outlined"]
    finally:
        pipe.unload_lora()
    assert without == 0 and with_lora * 8 >= 4, (without, with_lora)


def test_repr_shows_the_loaded_loras_and_the_added_tokens(pipe):
    data = OUTLINE_LORA.parent
    assert "LoRA" not in repr(pipe) and "tokens" not in repr(pipe)
    pipe.load_lora(OUTLINE_LORA, 0.5)
    pipe.load_textual_inversion(data / "ptri_embedding.safetensors")
    pipe.load_textual_inversion(data / "night_embedding.safetensors")
    try:
        assert repr(pipe).endswith("; LoRA lora_outline.safetensors×0.5; tokens <ptri> <night>×8)"), repr(pipe)
    finally:
        pipe.unload_lora()
        pipe.unload_textual_inversion()
    assert "LoRA" not in repr(pipe) and "tokens" not in repr(pipe)


def test_training_refuses_to_replace_an_existing_file_without_force(tmp_path, capsys):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"keep me")
    assert lora_train.main(["--out", str(out), "--steps", "1"]) == 2      # before any training
    assert out.read_bytes() == b"keep me"
    assert "pass --force" in capsys.readouterr().err


def test_force_replaces_the_file_only_once_the_new_one_is_written(tmp_path, monkeypatch):
    """--force trains first and then swaps the new file in: a run that fails on the way leaves the
    old file; one that succeeds removes the old record, which described the replaced file."""
    out, record = tmp_path / "mine.safetensors", tmp_path / "mine.json"
    out.write_bytes(b"old file")
    record.write_text("{}")
    args = ["--out", str(out), "--steps", "1", "--images", "2", "--batch", "2", "--force"]

    def broken(*a, **k):
        raise RuntimeError("training stopped")
    with monkeypatch.context() as m:
        m.setattr(lora_train, "train", broken)
        with pytest.raises(RuntimeError):
            lora_train.main(args)
    assert out.read_bytes() == b"old file" and record.exists()
    assert lora_train.main(args) == 0
    assert lora.read(out).metadata["sdlearn_lora"] and not record.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors"]
