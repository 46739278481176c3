"""LoRA files (sdlearn/lora.py) against diffusers' `load_lora_weights` with the same weights.

Random LoRA files in both formats are written for every layer a LoRA can target (attention
projections, feed-forwards, 1×1 and 3×3 convs of LoCon files, the text encoder's projections and
MLP), with α ≠ r. The UNet's and the text encoder's outputs must equal diffusers' (PEFT side
paths) within 1e-4 relative error, and must differ from the outputs without the LoRA (else the
comparison could not fail). Tiny size by default; SD v1.5 size under `make test-full`.
"""
from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import diffusers_from_original, diffusers_pipeline, original_file
from reference import cache_dir, rel_err
from test_clip import transformers_state_dict
from sdlearn import lora
from sdlearn.clip import CLIPTextModel
from sdlearn.configs import ModelConfig
from sdlearn.pipeline import load_pipeline
from sdlearn.unet import UNet

TINY = ModelConfig.tiny()
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


# ---- random LoRA files ------------------------------------------------------------------------

def random_layers(models: dict[str, torch.nn.Module], rank: int = 4, seed: int = 0,
                  only: str | None = None, vary_alpha: bool = False) -> dict[tuple[str, str], lora.LoRALayer]:
    """A random LoRALayer for every targetable layer (or those whose name contains `only`): ΔW
    about as large as W itself, so a wrong layer shows. α = r − 1 on linear layers and 1.5 r on
    convs, as LoCon files have a network α and a conv α; `vary_alpha`: α ∈ {r − 1, r, r + 1} by layer.

    diffusers 0.42.1 cannot be the reference for per-layer alphas beyond that linear/conv split:
    it turns a kohya file's alphas into PEFT's `alpha_pattern` under its old attention-processor
    names (…attn1.processor.to_q_lora.down.weight) and truncated text-encoder names, which match
    no module (PEFT warns "alpha_pattern keys did not match"), so those layers silently get the
    most common α. `test_each_layer_gets_its_own_alpha` checks sdlearn against the formula instead."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp, model in models.items():
        for i, (name, m) in enumerate(lora.lora_modules(model).items()):
            if only is not None and only not in name:
                continue
            w = m.weight
            down = torch.randn((rank, *w.shape[1:]), generator=g) / w[0].numel() ** 0.5
            up = torch.randn((w.shape[0], rank, *([1, 1] if w.dim() == 4 else [])), generator=g) / rank ** 0.5
            alpha = rank - 1 + i % 3 if vary_alpha else (1.5 * rank if w.dim() == 4 else rank - 1)
            out[comp, name] = lora.LoRALayer(down, up, alpha=float(alpha))
    return out


def write_kohya(path, layers) -> str:
    path.unlink(missing_ok=True)
    return str(lora.save_kohya(path, layers))


def write_peft(path, layers, alpha: dict[str, float] | None = None) -> str:
    """diffusers/PEFT keys (unet.….lora_A.weight); with `alpha` {component: α}, diffusers'
    `lora_adapter_metadata` holding each component's LoraConfig (else α = r)."""
    tensors, meta = {}, {"format": "pt"}
    for (comp, name), layer in layers.items():
        tensors[f"{comp}.{name}.lora_A.weight"] = layer.down
        tensors[f"{comp}.{name}.lora_B.weight"] = layer.up
    if alpha:
        config = {}
        for comp, a in alpha.items():
            # PEFT matches a target as a module-name suffix: leave out text_model., which
            # transformers 5's CLIPTextModel no longer has
            targets = sorted(name.removeprefix("text_model.") for c, name in layers if c == comp)
            rank = next(layer.rank for (c, _), layer in layers.items() if c == comp)
            config.update({f"{comp}.r": rank, f"{comp}.lora_alpha": a, f"{comp}.target_modules": targets})
        meta["lora_adapter_metadata"] = json.dumps(config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return str(path)


def inputs(pipe, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = pipe.tokenizer(["a red circle on the left", "a small blue square at the top"])
    latents = torch.randn(2, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size, generator=g)
    return ids, latents, torch.tensor([10, 700])


@torch.no_grad()
def outputs(pipe, ids, latents, t, reference: bool = False):
    """(text features, ε) of sdlearn's pipeline or, with reference=True, of a diffusers one, the
    UNet reading the same context (the reference's), so the UNet is compared on its own."""
    if reference:
        context = pipe.text_encoder(ids).last_hidden_state
        return context, pipe.unet(latents, t, encoder_hidden_states=context).sample
    context = pipe.text_encoder(ids)
    return context, pipe.unet(latents, t, context)


def assert_parity(ours, ref, n_loras: int = 1):
    ids, x, t = inputs(ours)
    plain = outputs(ours, ids, x, t) if n_loras == 0 else None
    c_ref, e_ref = outputs(ref, ids, x, t, reference=True)
    c, _ = outputs(ours, ids, x, t)
    with torch.no_grad():
        e = ours.unet(x, t, c_ref)
    assert rel_err(c, c_ref) < TOL, rel_err(c, c_ref)
    assert rel_err(e, e_ref) < TOL, rel_err(e, e_ref)
    return plain


# ---- fixtures: the same random weights in sdlearn and diffusers ------------------------------

@pytest.fixture(scope="module")
def ref():
    pipe = diffusers_from_original(TINY)
    pipe.tokenizer.model_max_length = 77
    return pipe


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "plain"])
def ours(request):
    """sdlearn's pipeline on the same original file, with fast_cpu's layers and without."""
    return load_pipeline(original_file(TINY), "cpu", torch.float32, fast=request.param)


@pytest.fixture(scope="module")
def files(ours):
    folder = cache_dir("lora")
    models = {"unet": ours.unet, "text_encoder": ours.text_encoder}
    a, b = random_layers(models, rank=4, seed=0), random_layers(models, rank=3, seed=1)
    return {"kohya": write_kohya(folder / "kohya.safetensors", a), "layers": a,
            "peft": write_peft(folder / "peft.safetensors", b, alpha={"unet": 5.0, "text_encoder": 2.0}),
            "peft_layers": b}


@pytest.fixture
def clean(ref, ours):
    """Both pipelines without any LoRA before and after each test."""
    ref.unload_lora_weights()
    ours.unload_lora()
    yield
    ref.unload_lora_weights()
    ours.unload_lora()


# ---- the formula --------------------------------------------------------------------------------

def test_delta_is_scale_alpha_over_rank_times_up_down():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    expected = 0.5 * (8 / 4) * up.double() @ down.double()
    assert rel_err(lora.lora_delta(down, up, alpha=8.0, scale=0.5), expected) < 1e-6
    assert rel_err(lora.lora_delta(down, up, alpha=None), up.double() @ down.double()) < 1e-6   # α = r


def test_conv_delta_equals_the_two_convolutions_it_replaces():
    """LoCon: a 3×3 down conv to r channels, then a 1×1 up conv = one 3×3 conv with up @ down."""
    g = torch.Generator().manual_seed(0)
    down, up, x = torch.randn(2, 5, 3, 3, generator=g), torch.randn(7, 2, 1, 1, generator=g), torch.randn(1, 5, 8, 8, generator=g)
    side = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
    fused = torch.nn.functional.conv2d(x, lora.lora_delta(down, up, alpha=None), padding=1)
    assert rel_err(fused, side) < 1e-5


def test_one_rank_check_for_the_formula_and_for_files():
    """lora_delta and resolve raise the same error (check_rank); the file's version names the layer."""
    with pytest.raises(lora.LoRAError, match=r"rank mismatch: down \(4, 6\) \(rank 4\) but up \(5, 3\) \(rank 3\)"):
        lora.lora_delta(torch.zeros(4, 6), torch.zeros(5, 3), alpha=None)
    assert lora.check_rank(torch.zeros(4, 6), torch.zeros(5, 4)) == 4


def test_linear_updates_fit_1x1_convs_and_nothing_else():
    assert lora.fits((64, 32, 1, 1), (64, 32)) and lora.fits((64, 32), (64, 32, 1, 1)) and lora.fits((8, 4, 3, 3), (8, 4, 3, 3))
    assert not lora.fits((64, 32, 3, 3), (64, 32)) and not lora.fits((64, 32), (32, 64))


def test_kohya_names_are_module_names_with_underscores_also_in_the_original_layout(ours):
    names = lora.kohya_names(ours)
    assert names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == (
        "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert names["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == (
        "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")
    assert names["lora_unet_input_blocks_1_0_in_layers_2"] == ("unet", "down_blocks.0.resnets.0.conv1")   # CompVis
    assert names["lora_unet_output_blocks_1_1_proj_out"] == ("unet", "up_blocks.0.attentions.1.proj_out")
    targets = {(c, n) for c, n in names.values()}
    assert len(targets) == sum(len(lora.lora_modules(getattr(ours, c))) for c in lora.COMPONENTS)


# ---- parity with diffusers ----------------------------------------------------------------------

def test_kohya_file_with_convs_and_alpha_matches_diffusers(ours, ref, files, clean):
    ids, x, t = inputs(ours)
    before = outputs(ours, ids, x, t)
    ref.load_lora_weights(files["kohya"], adapter_name="k")
    ref.set_adapters(["k"], [0.7])
    info = ours.load_lora(files["kohya"], scale=0.7)
    assert info.format == "kohya" and info.layers["unet"] > 100 and info.layers["text_encoder"] == 18
    assert_parity(ours, ref)
    after = outputs(ours, ids, x, t)
    assert rel_err(before[0], after[0]) > 0.05 and rel_err(before[1], after[1]) > 0.05   # it did change them


def test_peft_file_with_adapter_metadata_matches_diffusers(ours, ref, files, clean):
    ref.load_lora_weights(files["peft"], adapter_name="p")
    ref.set_adapters(["p"], [1.3])
    assert ours.load_lora(files["peft"], scale=1.3).format == "diffusers"
    assert_parity(ours, ref)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")   # PEFT: a second adapter, as intended
def test_two_loras_add(ours, ref, files, clean):
    ref.load_lora_weights(files["kohya"], adapter_name="k")
    ref.load_lora_weights(files["peft"], adapter_name="p")
    ref.set_adapters(["k", "p"], [0.7, -0.4])
    ours.load_lora(files["kohya"], 0.7)
    ours.load_lora(files["peft"], -0.4)
    assert [x.name for x in lora.loaded(ours)] == ["kohya.safetensors", "peft.safetensors"]
    assert_parity(ours, ref)


def test_a_scale_must_be_a_finite_real_number_and_nothing_changes_otherwise(ours, files, clean):
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    for scale, error in (("0.5", TypeError), (True, TypeError), (None, TypeError), (torch.tensor(0.5), TypeError),
                         (float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError)):
        with pytest.raises(error, match="scale must be a") as exc:
            ours.load_lora(files["kohya"], scale)
        assert "\n" not in str(exc.value) and "such as 0.8" in str(exc.value)
        assert lora.loaded(ours) == [] and all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())
    assert ours.load_lora(files["kohya"], 1).scale == 1.0 and isinstance(lora.loaded(ours)[0].scale, float)


def test_the_same_file_loaded_twice_is_applied_twice_with_a_warning(ours, files, clean):
    """Loading adds (by design), so a second load of one file gives 2·ΔW: allowed, but it warns, also
    when the path is spelled differently; another file does not warn."""
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = ours.unet.get_submodule(name).weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # the first load: no warning
        ours.load_lora(files["kohya"], 0.5)
    w1 = ours.unet.get_submodule(name).weight.clone()
    other_spelling = Path(files["kohya"]).parent / ".." / Path(files["kohya"]).parent.name / Path(files["kohya"]).name
    with pytest.warns(UserWarning, match=r"kohya.safetensors was already loaded \(scale 0.5\); it is now applied 2 "
                                         r"times \(total scale 1\); pipe.unload_lora\(\) removes every LoRA") as record:
        ours.load_lora(other_spelling, 0.5)
    assert len(record) == 1 and record[0].filename == __file__        # points at the caller's line
    assert rel_err(ours.unet.get_submodule(name).weight - w0, 2 * (w1 - w0)) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.load_lora(files["peft"], 0.5)


def test_unload_restores_the_original_tensors_bit_for_bit(ours, files, clean):
    """A restore, not a recomputation: unload puts back the very tensors the weights were (views of
    the memory-mapped file), so equality is exact by construction on any CPU."""
    before = {c: {k: (v.clone(), v.data_ptr()) for k, v in getattr(ours, c).state_dict().items()}
              for c in lora.COMPONENTS}
    ours.load_lora(files["kohya"], 0.7)
    ours.load_lora(files["peft"], 1.0)
    changed = sum(not torch.equal(v, before["unet"][k][0]) for k, v in ours.unet.state_dict().items())
    assert changed > 100
    assert ours.unload_lora() == len(files["layers"])
    for c in lora.COMPONENTS:
        for k, v in getattr(ours, c).state_dict().items():
            assert torch.equal(v, before[c][k][0]) and v.data_ptr() == before[c][k][1], k
    assert lora.loaded(ours) == []


def test_each_layer_gets_its_own_alpha(ours, clean, tmp_path):
    """W' − W = s·(α/r)·up@down on every layer, each with its own α (float32 rounding of W + ΔW)."""
    models = {"unet": ours.unet, "text_encoder": ours.text_encoder}
    layers = random_layers(models, rank=4, seed=2, vary_alpha=True)
    assert len({layer.alpha for layer in layers.values()}) == 3
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    ours.load_lora(write_kohya(tmp_path / "a.safetensors", layers), scale=0.6)
    for (comp, name), layer in layers.items():
        fused = models[comp].get_submodule(name).weight
        expected = 0.6 * layer.alpha / 4 * (layer.up.flatten(1).double() @ layer.down.flatten(1).double())
        assert rel_err((fused - before[comp][name + ".weight"]).flatten(1), expected) < 1e-5, name


def test_other_namings_give_the_same_weights(ours, files, clean, tmp_path):
    """Kohya files in the CompVis layout (lora_unet_input_blocks_…) and diffusers' older names
    (….lora.down.weight, …processor.to_q_lora.down.weight) fuse the same ΔW as the kohya file.
    Same tensors through the same arithmetic: equal bit for bit by construction."""
    layers = files["layers"]
    ours.load_lora(files["kohya"], 0.7)
    expected = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    expected_te = {k: v.clone() for k, v in ours.text_encoder.state_dict().items()}
    ours.unload_lora()
    rules = lora.unet_block_rules(ours.unet.config)
    compvis, old = {}, {}
    for (comp, name), layer in layers.items():
        original = lora.to_original_key(name + ".weight", rules).removesuffix(".weight") if comp == "unet" else name
        key = lora.kohya_name(comp, original)
        compvis.update({f"{key}.lora_down.weight": layer.down, f"{key}.lora_up.weight": layer.up,
                        f"{key}.alpha": torch.tensor(layer.alpha)})
        old_name = re.sub(r"(attn\d)\.to_(q|k|v|out\.0)$", r"\1.processor.to_\2", name).replace("to_out.0", "to_out")
        old_name = re.sub(r"self_attn\.(q|k|v|out)_proj$", r"self_attn.to_\1", old_name)
        style = "_lora." if old_name.endswith(("to_q", "to_k", "to_v", "to_out")) else ".lora."
        old.update({f"{comp}.{old_name}{style}down.weight": layer.down, f"{comp}.{old_name}{style}up.weight": layer.up,
                    f"{comp}.{old_name}{style.rstrip('.') if style == '_lora.' else ''}.alpha": torch.tensor(layer.alpha)})
    for tensors in (compvis, old):
        save_file(tensors, str(tmp_path / "f.safetensors"))
        ours.load_lora(tmp_path / "f.safetensors", 0.7)
        assert all(torch.equal(v, expected[k]) for k, v in ours.unet.state_dict().items())
        assert all(torch.equal(v, expected_te[k]) for k, v in ours.text_encoder.state_dict().items())
        ours.unload_lora()
        (tmp_path / "f.safetensors").unlink()


# ---- clear errors -------------------------------------------------------------------------------

def error_for(ours, tmp_path, tensors: dict[str, torch.Tensor]) -> str:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    weights = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    with pytest.raises(lora.LoRAError) as exc:
        ours.load_lora(path)
    assert all(torch.equal(v, weights[k]) for k, v in ours.unet.state_dict().items())   # nothing half-applied
    message = str(exc.value)
    assert "\n" not in message and "bad.safetensors" in message
    return message


def pair(key: str, down_shape, up_shape) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": torch.randn(down_shape), f"{key}.lora_up.weight": torch.randn(up_shape)}


def test_sd2_sdxl_rank_mismatch_missing_module_and_non_lora_files_get_one_line_errors(ours, tmp_path, clean):
    sd2_unet = pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (4, 1024), (64, 4))
    assert "SD 2.x" in error_for(ours, tmp_path, sd2_unet)
    sd2_te = pair("lora_te_text_model_encoder_layers_22_self_attn_q_proj", (4, 64), (64, 4))
    assert "SD 2.x" in error_for(ours, tmp_path, sd2_te)
    sdxl = pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (4, 768), (768, 4))
    assert "SDXL" in error_for(ours, tmp_path, sdxl)
    sdxl_unet = pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", (4, 2048), (640, 4))
    assert "SDXL" in error_for(ours, tmp_path, sdxl_unet)
    sd15_on_tiny = pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (4, 768), (320, 4))
    assert "SD v1.x" in error_for(ours, tmp_path, sd15_on_tiny)
    rank = pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (4, 64), (64, 3))
    assert "rank mismatch" in error_for(ours, tmp_path, rank)
    missing = pair("lora_unet_down_blocks_5_attentions_0_transformer_blocks_0_attn1_to_q", (4, 64), (64, 4))
    assert "no layer" in error_for(ours, tmp_path, missing)
    wrong = pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (4, 128), (64, 4))
    assert "[64, 128]" in error_for(ours, tmp_path, wrong)
    assert "not a LoRA" in error_for(ours, tmp_path, {"model.diffusion_model.conv_in.weight": torch.zeros(2)})
    half = {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3)}
    assert "no up weight" in error_for(ours, tmp_path, half)


# ---- SD v1.5 size ---------------------------------------------------------------------------------

@pytest.mark.full
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_kohya_and_peft_files_match_diffusers_at_sd15_size(tmp_path):
    """A random diffusers pipeline at SD v1.5 size; sdlearn's UNet and text encoder hold the very
    same tensors (assigned, not copied: the fused LoRA never writes into them, and the reference's
    side paths never change them). One kohya file on every layer (convs too, α ≠ r) and one PEFT
    file on the attention projections, loaded together."""
    cfg = ModelConfig.sd15()
    ref = diffusers_pipeline(cfg)
    ref.tokenizer.model_max_length = 77
    with torch.device("meta"):
        unet, text = UNet(cfg.unet), CLIPTextModel(cfg.text_encoder)
    unet.load_state_dict(ref.unet.state_dict(), strict=True, assign=True)
    text.load_state_dict(transformers_state_dict(ref.text_encoder), strict=True, assign=True)

    class Pipe:   # what lora.load needs of a pipeline
        pass
    ours = Pipe()
    ours.unet, ours.text_encoder, ours.tokenizer = unet.eval(), text.eval(), load_pipeline("tiny").tokenizer
    models = {"unet": unet, "text_encoder": text}
    stored = {c: {k: v.data_ptr() for k, v in m.state_dict().items()} for c, m in models.items()}
    kohya = write_kohya(tmp_path / "k.safetensors", random_layers(models, rank=8, seed=0))
    peft = write_peft(tmp_path / "p.safetensors", random_layers(models, rank=4, seed=1, only="attn"),
                      alpha={"unet": 8.0, "text_encoder": 2.0})
    ref.load_lora_weights(kohya, adapter_name="k")
    ref.load_lora_weights(peft, adapter_name="p")
    ref.set_adapters(["k", "p"], [0.8, 0.5])
    start = time.perf_counter()
    lora.load(ours, kohya, 0.8)
    lora.load(ours, peft, 0.5)
    seconds = time.perf_counter() - start
    ids = ours.tokenizer(["a photograph of an astronaut riding a horse"])
    x, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    c_ref, e_ref = outputs(ref, ids, x, t, reference=True)
    with torch.no_grad():
        c, e = text(ids), unet(x, t, c_ref)
    print(f"SD v1.5 size: text encoder {rel_err(c, c_ref):.1e}, UNet {rel_err(e, e_ref):.1e}; loading both {seconds:.1f} s")
    assert rel_err(c, c_ref) < TOL and rel_err(e, e_ref) < TOL, (rel_err(c, c_ref), rel_err(e, e_ref))
    lora.unload(ours)     # the very tensors back (the reference's, shared): a restore, exact by construction
    assert all({k: v.data_ptr() for k, v in m.state_dict().items()} == stored[c] for c, m in models.items())
