"""Every bad input gets one clear line: checkpoints, prompts, parameters, pictures.

What a learner sees is `sdlearn.load_pipeline(...)` / `pipe.generate(...)` / `sdlearn generate`
failing with one line that names the file or argument, says what was expected and what was
found, and what to do: never a traceback from deep inside torch as the only explanation.
`CHECKPOINT_CASES` is the catalogue of broken checkpoints; `python tests/test_bad_inputs.py`
prints the message of each (the list in the README and the issue's closing note).
"""
from __future__ import annotations

import json
import re
import struct
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

import sdlearn
from checkpoints import original_file
from sdlearn import checkpoint, safetensors_file
from sdlearn.cli import main as cli_main
from sdlearn.configs import ModelConfig
from sdlearn.safetensors_file import CheckpointError
from test_fuzz import MICRO, micro_state_dict as micro_state
from test_weights import _Payload   # unpickling it creates a file: the proof that code ran

TINY = ModelConfig.tiny()


def write(path: Path, sd: dict[str, torch.Tensor], config: ModelConfig | None = MICRO) -> Path:
    save_file(sd, str(path), metadata={"sdlearn_config": json.dumps(config.to_dict())} if config else None)
    return path


def one_line_error(call, error=CheckpointError, name: str | None = None) -> str:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    if name is not None:
        assert name in message, message
    return message


UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
TEXT_QKV = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


# ---- checkpoints: the catalogue ---------------------------------------------------------------

def _raw(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _bytes(content: bytes, name: str = "model.safetensors"):
    def make(d: Path) -> Path:
        (d / name).write_bytes(content)
        return d / name
    return make


def _keys(keys: dict[str, tuple[int, ...]], name: str = "model.safetensors"):
    def make(d: Path) -> Path:
        save_file({k: torch.zeros(s) for k, s in keys.items()}, str(d / name))
        return d / name
    return make


def _micro(change, name: str = "model.safetensors"):
    def make(d: Path) -> Path:
        sd = micro_state()
        change(sd)
        return write(d / name, sd)
    return make


def _truncated(d: Path) -> Path:
    path = write(d / "model.safetensors", micro_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _huge_header(d: Path) -> Path:
    """A 150 MB header in a file big enough to hold it (sparse: nothing is really written)."""
    path = d / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 150 * 2**20))
        f.truncate(8 + 150 * 2**20 + 16)
    return path


def _pickle_with_code(d: Path) -> Path:
    path = d / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(str(d / "pwned"))}, path)
    return path


def _diffusers_folder_without_vae(d: Path) -> Path:
    folder = d / "sd-folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text("{}")
    for comp in ("unet", "text_encoder"):
        (folder / comp / "config.json").write_text("{}")
    return folder


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


# name → (how to make it, what the message must say)
CHECKPOINT_CASES = {
    "missing path": (lambda d: d / "nothing.safetensors", "no such file"),
    "empty file": (_bytes(b""), "empty or truncated"),
    "random bytes": (_bytes(bytes(range(256)) * 4), "header length"),
    "truncated": (_truncated, "truncated"),
    "offsets outside the file": (_bytes(_raw({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1000]}},
                                             bytes(16))), "claims bytes 0…1,000"),
    "huge JSON header": (_huge_header, "limit 104,857,600"),
    "malformed JSON header": (_bytes(struct.pack("<Q", 9) + b'{"w": [1,'), "not valid JSON"),
    "deeply nested JSON header": (_bytes(struct.pack("<Q", 200_000) + b"[" * 200_000), "not valid JSON"),
    "wrong dtype": (_micro(_set(UNET_CONV_IN, torch.zeros(8, 4, 3, 3, dtype=torch.int64))),
                    "conv_in.weight has dtype I64 (expected a float type)"),
    "wrong shape": (_micro(_set(TEXT_QKV, torch.zeros(8, 9))), r"q_proj.weight [8, 9] (expected [8, 8])"),
    "missing keys": (_micro(lambda sd: [sd.pop(k) for k in sorted(sd) if ".encoder.layers.0.mlp." in k]),
                     "text_encoder is missing 4 tensor(s): text_model.encoder.layers.0.mlp.fc1.bias"),
    "SD 2.x": (_keys({"cond_stage_model.model.token_embedding.weight": (4, 4), UNET_CONV_IN: (4, 4)}), "SD 2.x"),
    "SDXL": (_keys({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (4, 4),
                    UNET_CONV_IN: (4, 4)}), "SDXL"),
    "inpainting (9 input channels)": (_keys({UNET_CONV_IN: (320, 9, 3, 3), "first_stage_model.x": (1,),
                                             "cond_stage_model.transformer.x": (1,)}), "inpainting"),
    "LoRA": (_keys({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}), "LoRA"),
    "VAE only": (_keys({"encoder.down.0.block.0.conv1.weight": (4, 4), "decoder.up.0.block.0.conv1.weight": (4, 4)}),
                 "VAE-only"),
    "diffusers folder missing a component": (_diffusers_folder_without_vae, "lacks vae/config.json"),
    "pickle with code": (_pickle_with_code, "refused to load"),
    "unknown file type": (_bytes(b"x", "model.onnx"), "unknown file type"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_each_broken_checkpoint_gets_one_line_naming_the_file(tmp_path, case):
    make, expected = CHECKPOINT_CASES[case]
    path = make(tmp_path)
    message = one_line_error(lambda: sdlearn.load_pipeline(str(path), device="cpu"), name=path.name)
    assert expected in message, message
    assert not (tmp_path / "pwned").exists()          # the pickle's code never ran


def test_sdlearn_info_reports_a_broken_checkpoint_in_one_line(tmp_path, capsys):
    path = _truncated(tmp_path)
    assert cli_main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlearn: error: model.safetensors") and err.count("\n") == 1


# ---- checkpoints: what the catalogue's error paths need ---------------------------------------

def test_nan_and_inf_weights_are_warned_naming_the_tensors(tmp_path):
    sd = micro_state()
    sd[UNET_CONV_IN] = sd[UNET_CONV_IN].clone()
    sd[UNET_CONV_IN][0, 0, 0, 0] = float("nan")
    sd[TEXT_QKV] = sd[TEXT_QKV].clone()
    sd[TEXT_QKV][1, 2] = float("-inf")
    path = write(tmp_path / "merged.safetensors", sd)
    with pytest.warns(UserWarning) as record:
        pipe = sdlearn.load_pipeline(str(path), device="cpu")
    messages = [str(r.message) for r in record]
    assert any("merged.safetensors: unet has NaN or infinite values in 1 tensor(s): conv_in.weight; the file "
               "holds them" in m for m in messages), messages
    assert any("text_encoder has NaN or infinite values in 1 tensor(s): "
               "text_model.encoder.layers.0.self_attn.q_proj.weight" in m for m in messages), messages
    assert not any("vae" in m for m in messages)
    assert torch.isnan(pipe.unet.conv_in.weight).any()                  # warned, still loaded as stored


def test_clean_weights_load_without_a_warning(tmp_path):
    path = write(tmp_path / "clean.safetensors", micro_state())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdlearn.load_pipeline(str(path), device="cpu")


def test_float16_overflow_is_warned_as_an_overflow_not_a_broken_file(tmp_path):
    sd = micro_state()
    sd[UNET_CONV_IN] = sd[UNET_CONV_IN] * 0 + 1e6                      # fine in float32, inf in float16
    path = write(tmp_path / "big.safetensors", sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdlearn.load_pipeline(str(path), device="cpu")
    with pytest.warns(UserWarning, match=r"unet has NaN or infinite values in 1 tensor\(s\): conv_in.weight; "
                                         r"they overflow float16: load it with dtype=torch.float32"):
        sdlearn.load_pipeline(str(path), device="cpu", dtype=torch.float16)


def test_large_finite_weights_whose_sum_overflows_are_not_warned(tmp_path):
    """The check sums each tensor in its own dtype; 288 values of 1000 sum past float16's 65504,
    yet every value is finite: no warning."""
    sd = micro_state()
    sd[UNET_CONV_IN] = torch.full_like(sd[UNET_CONV_IN], 1000.0)
    assert torch.isinf(sd[UNET_CONV_IN].half().sum())
    path = write(tmp_path / "large.safetensors", sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdlearn.load_pipeline(str(path), device="cpu", dtype=torch.float16)


def test_float_position_ids_are_ignored(tmp_path):
    """Merged files sometimes store position_ids as floats such as 75.99998: never load them."""
    clean = micro_state()
    corrupted = dict(clean, **{POSITION_IDS: torch.arange(77.0)[None] - torch.rand(1, 77) * 0.01})
    a = sdlearn.load_pipeline(str(write(tmp_path / "clean.safetensors", clean)), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # not even reported as an unused tensor
        b = sdlearn.load_pipeline(str(write(tmp_path / "merged.safetensors", corrupted)), device="cpu")
    ids = torch.randint(0, MICRO.text_encoder.vocab_size, (2, 77))
    assert torch.equal(a.text_encoder(ids), b.text_encoder(ids))


def test_huge_header_is_refused_without_reading_it(tmp_path):
    path = _huge_header(tmp_path)
    start = time.perf_counter()
    one_line_error(lambda: safetensors_file.read_safetensors_header(path), name=path.name)
    assert time.perf_counter() - start < 0.5


def test_a_folder_or_unreadable_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    assert "cannot be read" in one_line_error(lambda: safetensors_file.read_safetensors_header(tmp_path / "model.safetensors"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field, value, message", [
    (("text_encoder", "num_hidden_layers"), 10**7, r"num_hidden_layers is '10000000'; expected int in \(0, 64\]"),
    (("unet", "block_out_channels"), [8, "16"], r"block_out_channels is .*expected 1 to 8 levels of int"),
    (("unet", "layers_per_block"), 0, r"layers_per_block is '0'"),
    (("vae", "scaling_factor"), float("nan"), r"scaling_factor is 'nan'; expected float"),
    (("unet", "attention_levels"), [1, 0], r"attention_levels is .*expected 1 to 8 levels of bool"),
    (("text_encoder", "num_attention_heads"), 3, r"text encoder 8 / 3 heads"),
    (("unet", "norm_num_groups"), 3, r"configuration does not describe a buildable unet \(ValueError"),
])
def test_a_config_in_the_metadata_that_cannot_be_built_is_refused(tmp_path, field, value, message):
    """A file's metadata is input too: a huge layer count would hang the build, a wrong type would
    fail deep inside torch."""
    config = MICRO.to_dict()
    config[field[0]][field[1]] = value
    path = tmp_path / "model.safetensors"
    save_file(micro_state(), str(path), metadata={"sdlearn_config": json.dumps(config)})
    start = time.perf_counter()
    got = one_line_error(lambda: sdlearn.load_pipeline(str(path), device="cpu"), name=path.name)
    assert re.search(message, got), got
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("component, config, message", [
    ("unet", [1, 2], "unet/config.json holds a JSON list"),
    ("unet", {"block_out_channels": 5}, "sd/unet/config.json: 'int' object is not iterable"),
    ("vae", {"layers_per_block": "two"}, "VAEConfig.layers_per_block is 'two'"),
    ("text_encoder", "{", "text_encoder/config.json is not valid JSON"),
])
def test_a_diffusers_folder_with_a_broken_config_json(tmp_path, component, config, message):
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    for comp in checkpoint.COMPONENTS:
        (folder / comp).mkdir()
        (folder / comp / "config.json").write_text("{}")
    (folder / component / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert message in one_line_error(lambda: checkpoint.open_checkpoint(folder), name="sd")


def test_a_pickle_whose_keys_are_not_names_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({0: torch.zeros(2), "w": torch.zeros(2)}, path)
    assert "expected a dict of tensors by name" in one_line_error(lambda: checkpoint.open_checkpoint(path), name="odd.pt")


# ---- prompts ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # tiny models gain nothing from threads on a busy 2-core machine
    yield sdlearn.load_pipeline(str(original_file(TINY)), device="cpu")
    torch.set_num_threads(threads)


def generate(pipe, prompt, **kw):
    return pipe.generate(prompt, steps=1, sampler="ddim", seed=0, progress=False, **kw).pixels


def test_control_characters_are_bytes_as_transformers_reads_them(pipe):
    transformers = pytest.importorskip("transformers")
    from checkpoints import write_tokenizer_files
    from reference import cache_dir
    hf = transformers.CLIPTokenizer(*map(str, write_tokenizer_files(cache_dir("tokenizer-files"))))
    texts = ["a\x00cat", "\x07\x08\x1b[31mred", "\x7f", "a\u0085b", "a\u200bb", "\u202eevil", "\ufeffbom", "\x1c\x1d"]
    for text in texts:
        assert pipe.tokenizer.encode(text) == hf(text).input_ids, ascii(text)


def test_lone_surrogates_become_the_replacement_character_with_a_warning(pipe):
    """A lone surrogate (U+D800–U+DFFF without its partner) is not text: UTF-8 cannot encode it.
    sdlearn reads it as U+FFFD '�' and says so; a complete pair is the character it encodes."""
    tok = pipe.tokenizer
    with pytest.warns(UserWarning, match=r"1 lone surrogate code point\(s\), which are not text \(U\+D800 at 2\); "
                                         r"each became U\+FFFD"):
        ids = tok("a \ud800 cat")
    assert torch.equal(ids, tok("a \ufffd cat"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(tok("\ud83d\udc31"), tok("🐱"))            # a pair is no error
    with pytest.warns(UserWarning, match=r"U\+DCFF at 0"):            # a byte kept by surrogateescape
        assert tok.encode("\udcff") == tok.encode("\ufffd")
    with pytest.warns(UserWarning, match="lone surrogate"):
        assert torch.equal(generate(pipe, "a \ud800 red circle"), generate(pipe, "a \ufffd red circle"))


def test_whitespace_only_prompt_is_the_empty_prompt(pipe):
    assert torch.equal(generate(pipe, " \t\n\u3000 "), generate(pipe, ""))


def test_a_long_prompt_through_generate_names_the_dropped_words(pipe):
    prompt = " ".join(["red"] * 75 + ["circle", "zebra"])
    with pytest.warns(UserWarning, match=r"dropped: 'circle zebra'"):
        generate(pipe, prompt)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(guidance=float("inf")), ValueError, r"guidance=inf is out of range: expected a number ≥ 0.0 and finite"),
    (dict(steps=10**9), ValueError, r"steps=1000000000 is out of range: expected 1 ≤ steps ≤ 1000"),
    (dict(steps=-3), ValueError, r"steps=-3 is out of range"),
    (dict(steps=float("nan")), TypeError, r"steps must be an int"),
    (dict(strength=-0.1, image=Image.new("RGB", (64, 64))), ValueError, r"strength=-0.1 is out of range"),
    (dict(sampler="DDIM"), ValueError, r"unknown sampler 'DDIM'; expected one of ddpm, ddim, pndm"),
    (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.float16)), ValueError, r"latents are torch.float16"),
])
def test_bad_parameters_are_refused_before_any_work(pipe, kwargs, error, match):
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        message = one_line_error(lambda: pipe.generate("a red circle", progress=False, **kwargs), error)
    finally:
        hook.remove()
    assert re.search(match, message), message
    assert not calls                                   # refused before the text encoder ran


# ---- pictures ---------------------------------------------------------------------------------

def _palette(transparent: bool) -> Image.Image:
    img = Image.new("RGB", (64, 64), (200, 30, 30)).convert("P")
    if transparent:
        img.info["transparency"] = 0
    return img


def _bomb(path: Path) -> Path:
    """A PNG whose header claims 40000×40000 pixels (1.6 gigapixels) around 10 bytes of data."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("image, match", [
    (_palette(False), r"image has PIL mode 'P'; expected an RGB picture: convert it first \(e.g. image.convert\('RGB'\)\)"),
    (_palette(True), r"image has PIL mode 'P'; expected an RGB picture: it has an alpha channel"),
    (Image.new("LA", (64, 64)), r"image has PIL mode 'LA'; expected an RGB picture: it has an alpha channel"),
    (Image.new("CMYK", (64, 64)), r"image has PIL mode 'CMYK'; expected an RGB picture"),
    (Image.new("I;16", (64, 64)), r"image has PIL mode 'I;16'; expected an RGB picture"),
])
def test_pictures_in_other_modes_are_named(pipe, image, match):
    assert re.search(match, one_line_error(lambda: generate(pipe, "a", image=image), ValueError))


def test_non_picture_files_are_named_for_image_and_mask(pipe, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture, just text renamed .png\n")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    bomb = _bomb(tmp_path / "bomb.png")
    cases = [(dict(image=text), "image notes.png: not a picture PIL can read"),
             (dict(image=good, mask=text), "mask notes.png: not a picture PIL can read"),
             (dict(image=cut), "image cut.png: not a picture PIL can read"),
             (dict(image=bomb), "image bomb.png: Image size (1600000000 pixels) exceeds limit"),
             (dict(image=tmp_path), f"image {tmp_path}: no such file"),
             (dict(image=good, mask=tmp_path / "none.png"), "mask " + str(tmp_path / "none.png") + ": no such file")]
    for kwargs, expected in cases:
        assert expected in one_line_error(lambda: generate(pipe, "a", **kwargs), ValueError)


def test_mask_of_another_size_is_refused(pipe):
    message = one_line_error(lambda: generate(pipe, "a", image=Image.new("RGB", (64, 64)),
                                              mask=Image.new("L", (32, 64))), ValueError)
    assert "mask is 32×64 but image is 64×64 (W×H)" in message


# ---- the command line ---------------------------------------------------------------------------

def test_cli_prompt_with_an_undecodable_byte_writes_its_png(tmp_path, capsys):
    """On Linux a command-line byte that is not UTF-8 reaches Python as a lone surrogate
    (surrogateescape). The picture is made and its PNG records the prompt as it was read."""
    out = tmp_path / "x.png"
    with pytest.warns(UserWarning, match="U\\+DCFF"):
        code = cli_main(["generate", "a \udcff circle", "--weights", str(original_file(TINY)), "-o", str(out),
                         "--steps", "1", "--sampler", "ddim", "--seed", "0", "-q"])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as img:
        assert img.text["prompt"] == "a \ufffd circle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_cli_non_picture_image_is_one_line_and_writes_nothing(tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_text("hello")
    code = cli_main(["generate", "a", "--image", str(junk), "--weights", str(original_file(TINY)),
                     "-o", str(tmp_path / "out.png"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sdlearn: error: --image junk.png: not a picture") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.png"]


if __name__ == "__main__":      # print the catalogue: what a user sees for each broken checkpoint
    import tempfile
    for case, (make, _) in CHECKPOINT_CASES.items():
        with tempfile.TemporaryDirectory() as d:
            path = make(Path(d))
            try:
                sdlearn.load_pipeline(str(path), device="cpu")
                print(f"{case}: (loaded)")
            except CheckpointError as exc:
                print(f"{case}: {exc}")
