"""Fuzzing the parts that read what users type and download: the tokenizer, the safetensors
header reader, and the key mapper.

The promises tested here hold for *any* input, not just the ones someone thought of:
- the tokenizer never raises on a string and always returns 77 ids: 49406, the prompt's ids
  (at most 75), then end tokens 49407; on assigned characters it agrees with transformers;
- the safetensors reader, given arbitrary bytes, a random JSON header or a valid file with bytes
  changed, either reads tensors that lie inside the file or raises `CheckpointError`, nothing else;
- the key mapper, given random key sets and shapes, reports (a layout, unexpected keys, a
  `CheckpointError`, warnings), never crashes with anything else.

Budgets are bounded (a few hundred examples each) and derandomised, so the default run is
fast and the same on every machine; raise `max_examples` locally to search harder.
"""
from __future__ import annotations

import json
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import regex
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

from sdlearn import checkpoint, layouts, safetensors_file
from sdlearn.configs import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from sdlearn.tokenizer import default_tokenizer

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# A model small enough to write to disk hundreds of times (100 k parameters), with a UNet level
# without attention, so the rename rules of both kinds of level are exercised.
MICRO = ModelConfig(
    CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
    UNetConfig(block_out_channels=(8, 16), attention_levels=(True, False), layers_per_block=1, num_heads=2,
               cross_attention_dim=8, norm_num_groups=4, sample_size=4),
    VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16))


@pytest.fixture(scope="module")
def scratch():
    """One folder for the whole module: hypothesis runs many examples per test function."""
    with tempfile.TemporaryDirectory(prefix="sdlearn-fuzz-") as d:
        yield Path(d)


# ---- the tokenizer ----------------------------------------------------------------------------

BOS, EOS = 49406, 49407
WORDS = ["a", "red", "circle", "photograph", "astronaut", "cat,", "don't", "3.14", "café", "ΟΔΟΣ", "猫", "🐱",
         "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "\x00", "\x07", "\x1b[31m", "\u202e", "\u200b",
         "\ufeff", "\ud800", "\udcff", "\ud83d\udc31", "\t", "\n", "  ", "\u3000", "zzzzqxj", "!!!", "&amp;"]
# Any code points at all: controls, format characters, unassigned ones, lone surrogates.
ANY_TEXT = st.one_of(st.text(st.characters(exclude_categories=()), max_size=120),
                     st.lists(st.sampled_from(WORDS), max_size=120).map(" ".join),
                     st.lists(st.sampled_from(WORDS), max_size=40).map("".join))


@FUZZ
@given(text=ANY_TEXT)
def test_tokenizer_always_gives_start_real_ids_then_end_tokens(text):
    tok = default_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # truncation and lone-surrogate warnings
        ids = tok(text)
        body = tok.encode(text)[1:-1]
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    row = ids[0].tolist()
    n = min(len(body), 75)
    assert row[0] == BOS
    assert row[1:1 + n] == body[:n]
    assert row[1 + n:] == [EOS] * (76 - n)                  # the end token, then padding with it
    assert all(0 <= i < BOS for i in body if "<|" not in text)   # special ids only from the literals
    assert (len(body) == 0) == bool(regex.fullmatch(r"\s*", text))   # nothing but whitespace ↔ no ids


# Characters assigned in Python's Unicode tables (no surrogates): regex libraries built on newer
# Unicode versions classify newly assigned code points differently, which is no bug of either.
ASSIGNED = st.characters(codec="utf-8", exclude_categories=("Cn", "Cs"))


@settings(FUZZ, max_examples=300)
@given(text=st.one_of(st.text(ASSIGNED, max_size=60),
                      st.lists(st.one_of(st.sampled_from(WORDS[:21] + WORDS[24:]), st.text(ASSIGNED, max_size=8)),
                               max_size=100).map(" ".join)))
def test_tokenizer_matches_transformers_on_random_text(hf_tokenizer, text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = default_tokenizer()(text)
    ref = hf_tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours, ref), ascii(text)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from checkpoints import write_tokenizer_files
    from reference import cache_dir
    vocab, merges = write_tokenizer_files(cache_dir("tokenizer-files"))
    return transformers.CLIPTokenizer(str(vocab), str(merges))


# ---- the safetensors header -------------------------------------------------------------------

def _read_everything(path: Path) -> None:
    """What a user's load does with a file: the header, then every tensor."""
    f = safetensors_file.SafetensorsFile(path)
    for k in f.keys():
        info = f.header.tensors[k]
        t = f[k]
        assert tuple(t.shape) == info.shape and t.dtype == safetensors_file.DTYPES[info.dtype]
        assert f.header.data_start + info.end <= f.header.file_size


def _only_checkpoint_errors(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    try:
        _read_everything(path)
    except safetensors_file.CheckpointError as exc:
        assert path.name in str(exc) and "\n" not in str(exc)


@FUZZ
@given(content=st.one_of(st.binary(max_size=300),
                         st.binary(max_size=200).map(lambda b: struct.pack("<Q", len(b)) + b),
                         st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=100))
                         .map(lambda t: struct.pack("<Q", t[0]) + t[1])))
def test_header_reader_on_arbitrary_bytes_raises_only_checkpoint_error(scratch, content):
    _only_checkpoint_errors(scratch / "random.safetensors", content)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
ENTRY = st.fixed_dictionaries(
    {"dtype": st.one_of(st.sampled_from([*safetensors_file.DTYPES, "Q99", "f32", ""]), JSON),
     "shape": st.one_of(st.lists(st.integers(-1, 6), max_size=4), JSON),
     "data_offsets": st.one_of(st.lists(st.integers(-8, 120), min_size=0, max_size=3), JSON)},
    optional={"extra": JSON})
HEADER = st.dictionaries(st.text(max_size=10), st.one_of(ENTRY, JSON), max_size=5).flatmap(
    lambda h: st.one_of(st.just(h), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)
                        .map(lambda m: {**h, "__metadata__": m}),
                        JSON.map(lambda m: {**h, "__metadata__": m})))


@FUZZ
@given(header=st.one_of(HEADER, JSON), data=st.binary(max_size=120), pad=st.sampled_from(["", " ", "\n" * 3]),
       nest=st.sampled_from([0, 0, 0, 100_000]))
def test_header_reader_on_random_json_headers_raises_only_checkpoint_error(scratch, header, data, pad, nest):
    text = ("[" * nest + json.dumps(header) + "]" * nest + pad).encode()
    _only_checkpoint_errors(scratch / "json.safetensors", struct.pack("<Q", len(text)) + text + data)


@pytest.fixture(scope="module")
def valid_file_bytes(scratch) -> bytes:
    path = scratch / "valid.safetensors"
    save_file({"a": torch.randn(3, 2), "b": torch.arange(5), "c": torch.ones(2).half(), "d": torch.zeros(0, 4),
               "e": torch.tensor([True, False, True])}, str(path), metadata={"note": "x"})
    return path.read_bytes()


EDIT = st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]), st.integers(0, 10**6), st.integers(0, 255))


@FUZZ
@given(edits=st.lists(EDIT, min_size=1, max_size=4))
def test_header_reader_on_mutated_valid_files_raises_only_checkpoint_error(scratch, valid_file_bytes, edits):
    b = bytearray(valid_file_bytes)
    for op, where, value in edits:
        i = where % (len(b) + 1)
        if op == "set" and i < len(b):
            b[i] = value
        elif op == "insert":
            b[i:i] = bytes([value])
        elif op == "delete":
            del b[i:i + 1 + value % 4]
        elif op == "truncate":
            del b[i:]
    _only_checkpoint_errors(scratch / "mutated.safetensors", bytes(b))


# ---- the key mapper ---------------------------------------------------------------------------

SEGMENTS = ["model", "diffusion_model", "first_stage_model", "cond_stage_model", "transformer", "text_model",
            "model_ema", "conditioner", "embedders", "input_blocks", "output_blocks", "middle_block", "time_embed",
            "encoder", "decoder", "down", "up", "mid", "block", "attn_1", "layers", "down_blocks", "up_blocks",
            "mid_block", "resnets", "attentions", "transformer_blocks", "attn2", "to_k", "lora_down", "lora_up",
            "in_layers", "out_layers", "emb_layers", "skip_connection", "nin_shortcut", "proj_out", "q", "k", "v",
            "norm", "op", "conv", "weight", "bias", "position_ids", "0", "1", "2", "3", "9", "12", "", " ", "é"]
KEY = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8).map(".".join)


@settings(FUZZ, max_examples=300)
@given(keys=st.lists(KEY, max_size=30))
def test_layout_detection_and_renaming_of_random_keys_report_never_crash(keys):
    for comp in checkpoint.COMPONENTS:
        rules = layouts.block_rules(comp, MICRO)
        for k in keys:
            ours = layouts.from_original_key(k, rules)
            assert ours is None or isinstance(ours, str)
    try:
        assert layouts.detect_layout(keys, "model.safetensors") == "original"
    except safetensors_file.CheckpointError as exc:
        assert "model.safetensors" in str(exc) and "\n" not in str(exc)


def micro_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete MICRO checkpoint in the original layout (sdlearn's own modules, random weights)."""
    torch.manual_seed(seed)
    sds = {c: checkpoint.MODEL_CLASSES[c](getattr(MICRO, c)).state_dict() for c in checkpoint.COMPONENTS}
    return {k: v.contiguous() for k, v in layouts.to_original_layout(sds, MICRO).items()}


@pytest.fixture(scope="module")
def micro_state() -> dict[str, torch.Tensor]:
    return micro_state_dict()


CHANGE = st.tuples(st.sampled_from(["drop", "shape", "dtype", "nan", "add", "rename"]), st.integers(0, 10**6),
                   KEY, st.lists(st.integers(0, 3), max_size=3), st.sampled_from([torch.int64, torch.bool,
                                                                                   torch.float16, torch.bfloat16]))
FIELDS = [(part, name) for part, fields in MICRO.to_dict().items() for name in fields]
FIELD_VALUE = st.one_of(JSON, st.integers(-3, 70), st.lists(st.integers(-3, 40), max_size=9))


def _config_with(changes) -> str:
    d = MICRO.to_dict()
    for (part, name), value in changes:
        d[part][name] = value
    return json.dumps(d)


METADATA = st.one_of(st.just("micro"), st.just(None), st.text(max_size=20), JSON.map(json.dumps),
                     st.lists(st.tuples(st.sampled_from(FIELDS), FIELD_VALUE), min_size=1, max_size=3).map(_config_with),
                     st.builds(lambda d: json.dumps({**MICRO.to_dict(), **d}),
                               st.dictionaries(st.sampled_from(["unet", "vae", "text_encoder"]), JSON, max_size=2)))


@settings(FUZZ, max_examples=120)
@given(changes=st.lists(CHANGE, max_size=6), metadata=METADATA)
def test_checkpoints_with_random_key_sets_load_or_raise_checkpoint_error(scratch, micro_state, changes, metadata):
    sd = dict(micro_state)
    for op, i, key, shape, dtype in changes:
        victim = sorted(sd)[i % len(sd)] if sd else None
        if op == "drop" and victim:
            del sd[victim]
        elif op == "shape" and victim:
            sd[victim] = torch.zeros(shape)
        elif op == "dtype" and victim:
            sd[victim] = sd[victim].to(dtype)
        elif op == "nan" and victim and sd[victim].is_floating_point() and sd[victim].numel():
            sd[victim] = sd[victim].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view(sd[victim].shape)
        elif op == "add":
            sd[key] = torch.zeros(shape)
        elif op == "rename" and victim:
            sd[key] = sd.pop(victim)
    meta = {"sdlearn_config": json.dumps(MICRO.to_dict()) if metadata == "micro" else metadata} if metadata else None
    path = scratch / "keys.safetensors"
    save_file(sd, str(path), metadata=meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # unexpected keys and NaN are reported as warnings
        try:
            ckpt = checkpoint.open_checkpoint(path)
            for comp in checkpoint.COMPONENTS:
                model = checkpoint.load_component(ckpt, comp)
                assert not any(p.is_meta for p in model.parameters())
        except safetensors_file.CheckpointError as exc:
            assert "keys.safetensors" in str(exc) and "\n" not in str(exc)
