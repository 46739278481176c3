"""Notebook 01 (the weights): a tensor's place in a safetensors file, its size in bytes, and the
rename rules from the original (CompVis) key names to sdlearn's."""
from __future__ import annotations

import atexit
import functools
import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import layouts, safetensors_file
from ..configs import UNetConfig, VAEConfig
from .core import Case, Exercise, Mistake, register

# ------------------------------------------------------------------------ tensor_location
# (path, name) → (header length N, dtype, shape, (first byte, end byte) in the file)


def _package_location(path, name):
    header = safetensors_file.read_safetensors_header(path)
    info = header.tensors[name]
    return (header.data_start - 8, info.dtype, info.shape,
            (header.data_start + info.begin, header.data_start + info.end))


@functools.lru_cache(maxsize=1)
def _sample_files() -> dict[str, Path]:
    """Small safetensors files written once per process (fixed contents, fixed seed)."""
    folder = Path(tempfile.mkdtemp(prefix="sdlearn-exercise-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    files = {
        "three": ({"conv.weight": torch.randn(8, 4, 3, 3, generator=g),
                   "conv.bias": torch.randn(8, generator=g),
                   "norm.weight": torch.ones(4)}, {"format": "pt"}),
        "mixed": ({"token_embedding": torch.randn(300, 16, generator=g).half(),
                   "scale": torch.tensor(0.18215, dtype=torch.bfloat16),
                   "steps": torch.arange(5)}, {"note": "x" * 37}),
    }
    out = {}
    for stem, (tensors, metadata) in files.items():
        out[stem] = folder / f"{stem}.safetensors"
        save_file(tensors, str(out[stem]), metadata=metadata)
    return out


def _location_cases() -> list[Case]:
    f = _sample_files()
    tiny = Path(safetensors_file.__file__).parent / "data" / "tiny.safetensors"
    return [Case("a 3-tensor float32 file, tensor 'conv.bias'", (f["three"], "conv.bias")),
            Case("a file with float16, bfloat16 and int64 tensors, tensor 'steps'", (f["mixed"], "steps")),
            Case("the same file, tensor 'scale' (a 0-d tensor: shape ())", (f["mixed"], "scale")),
            Case("the bundled tiny checkpoint, tensor 'first_stage_model.decoder.conv_out.bias'",
                 (tiny, "first_stage_model.decoder.conv_out.bias"))]


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _offsets_as_stored(path, name):        # data_offsets used as they are: relative to the data section
    n, header = _header(path)
    e = header[name]
    return n, e["dtype"], tuple(e["shape"]), tuple(e["data_offsets"])


def _forgot_length_field(path, name):      # shifted by the header, not by the 8-byte length before it
    n, header = _header(path)
    e = header[name]
    begin, end = e["data_offsets"]
    return n, e["dtype"], tuple(e["shape"]), (n + begin, n + end)


def _length_includes_prefix(path, name):   # reported 8 + N as the header's length
    n, header = _header(path)
    e = header[name]
    begin, end = e["data_offsets"]
    return 8 + n, e["dtype"], tuple(e["shape"]), (8 + n + begin, 8 + n + end)


register(Exercise(
    name="tensor_location", notebook="01_weights",
    reference=_package_location,
    cases=_location_cases,
    mistakes=[Mistake("data_offsets count from the first byte after the header, not from the start of the "
                      "file: add the bytes that come before the data.", _offsets_as_stored),
              Mistake("the data starts after the 8-byte length field AND the N-byte header; your byte "
                      "range is 8 bytes too early.", _forgot_length_field),
              Mistake("the header length is the number stored in the first 8 bytes (N), without the 8 "
                      "bytes of the field itself.", _length_includes_prefix)],
    hint="read N as a little-endian unsigned 64-bit integer (as section 1 does), then exactly N bytes of JSON; "
         "dtype and shape are the entry's own fields."))


# --------------------------------------------------------------------------- tensor_nbytes

def _package_nbytes(dtype, shape):
    numel = safetensors_file.TensorInfo(dtype, tuple(shape), 0, 0).numel
    return numel * safetensors_file.DTYPES[dtype].itemsize


def _nbytes_cases() -> list[Case]:
    return [Case("dtype 'F16', shape [320, 4, 3, 3]", ("F16", [320, 4, 3, 3])),
            Case("dtype 'F32', shape [49408, 768]", ("F32", [49408, 768])),
            Case("dtype 'BF16', shape [1280]", ("BF16", [1280])),
            Case("dtype 'I64', shape [1, 77]", ("I64", [1, 77])),
            Case("dtype 'U8', shape [3, 5]", ("U8", [3, 5])),
            Case("dtype 'F32', shape [] (a scalar)", ("F32", [])),
            Case("dtype 'F16', shape [0, 4] (an empty tensor)", ("F16", [0, 4]))]


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _elements_not_bytes(dtype, shape):
    return _numel(shape)


def _bf16_as_four(dtype, shape):           # "F16" is 2 bytes, anything else taken as float32
    return _numel(shape) * (2 if dtype == "F16" else 8 if dtype == "I64" else 1 if dtype == "U8" else 4)


def _always_four(dtype, shape):
    return _numel(shape) * 4


def _bits_not_bytes(dtype, shape):
    return _numel(shape) * {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16,
                            "I8": 8, "U8": 8, "BOOL": 8}[dtype]


register(Exercise(
    name="tensor_nbytes", notebook="01_weights",
    reference=_package_nbytes,
    cases=_nbytes_cases,
    mistakes=[Mistake("that is the number of elements; multiply by the bytes each element takes.",
                      _elements_not_bytes),
              Mistake("bfloat16 ('BF16') takes 2 bytes per element, like float16: it keeps float32's "
                      "exponent but only 7 mantissa bits.", _bf16_as_four),
              Mistake("not every tensor is float32: the dtype decides the bytes "
                      "per element (section 3's table; F16 takes 2).", _always_four),
              Mistake("that counts bits; a byte is 8 bits.", _bits_not_bytes)],
    hint="two numbers decide the size: how many elements the shape holds (how many does a scalar, "
         "shape [], hold?) and how many bytes one element of the dtype takes (section 3)."))


# ---------------------------------------------------------------------------- sdlearn_key
# An original key (after its component prefix) → the sdlearn / diffusers name, with the rules.

def _rules(component: str):
    if component == "unet":
        return layouts.unet_block_rules(UNetConfig.sd15())
    if component == "vae":
        return layouts.vae_block_rules(VAEConfig.sd15())
    # Made-up rules where one block's name is the start of another's ("blocks.1", "blocks.12").
    return [("first", "blocks.1", [("inner", "in")]), ("twelfth", "blocks.12", [("inner", "in")])]


def _key_cases() -> list[Case]:
    unet, vae, made_up = _rules("unet"), _rules("vae"), _rules("made_up")
    cases = [("input_blocks.1.0.in_layers.2.weight", unet, "SD v1.5's UNet rules"),
             ("output_blocks.3.0.skip_connection.bias", unet, "SD v1.5's UNet rules"),
             ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", unet, "SD v1.5's UNet rules"),
             ("middle_block.2.emb_layers.1.weight", unet, "SD v1.5's UNet rules"),
             ("time_embed.0.weight", unet, "SD v1.5's UNet rules"),
             ("decoder.up.0.block.0.nin_shortcut.weight", vae, "SD v1.5's VAE rules"),
             ("encoder.mid.attn_1.proj_out.bias", vae, "SD v1.5's VAE rules"),
             ("blocks.12.in.weight", made_up, "made-up rules for blocks 'blocks.1' and 'blocks.12'"),
             ("input_blocks.99.0.weight", unet, "SD v1.5's UNet rules (no rule covers it: None)")]
    return [Case(f"key {key!r} with {label}", (key, rules)) for key, rules, label in cases]


def _rename(key, rules, matches, inner_renames=True):
    """Shared body of the wrong versions: the block chosen by `matches`, then the inner renames."""
    hit = matches(key, rules)
    if hit is None:
        return None
    ours, theirs, inner = hit
    rest = key[len(theirs) + 1:]
    if inner_renames:
        for a, b in inner:
            if rest.startswith(b + "."):
                rest = a + rest[len(b):]
                break
    return f"{ours}.{rest}" if rest else ours


def _longest(key, rules):
    hits = [r for r in rules if key == r[1] or key.startswith(r[1] + ".")]
    return max(hits, key=lambda r: len(r[1])) if hits else None


def _no_inner_renames(key, rules):
    return _rename(key, rules, _longest, inner_renames=False)


def _first_prefix_without_dot(key, rules):  # "blocks.1" taken for "blocks.12.…"
    return _rename(key, rules, lambda k, rs: next((r for r in rs if k.startswith(r[1])), None))


def _rules_read_backwards(key, rules):      # matched the key against the sdlearn side of each rule
    return layouts.to_original_key(key, rules)


register(Exercise(
    name="sdlearn_key", notebook="01_weights",
    reference=lambda key, rules: layouts.from_original_key(key, rules),
    cases=_key_cases,
    mistakes=[Mistake("each rule is (sdlearn block, original block, inner renames): an original key must be "
                      "matched against the rule's SECOND entry and renamed to its first.", _rules_read_backwards),
              Mistake("after renaming the block, the rest of the key may need renaming too: apply the first "
                      "inner pair (sdlearn name, original name) whose original name starts the rest "
                      "(in_layers.2 → conv1).", _no_inner_renames),
              Mistake("a block prefix matches only up to a dot: 'blocks.1' is not the start of "
                      "'blocks.12.in.weight'. When several blocks match, which one should win?",
                      _first_prefix_without_dot)],
    hint="try it by hand on 'input_blocks.1.0.in_layers.2.weight' with section 4's rules: which rule's original "
         "block starts the key, what takes that block's place, and which inner pair renames the rest?"))


# ------------------------------------------------------------------ parameters from the header

def _count_reference(header: dict, prefix: str) -> int:
    """Parameters of the tensors whose key starts with `prefix`: the product of each shape."""
    return sum(math.prod(e["shape"]) for k, e in header.items() if k != "__metadata__" and k.startswith(prefix))


def _count_cases() -> list[Case]:
    header = {"__metadata__": {"format": "pt"},
              "model.diffusion_model.conv_in.weight": {"dtype": "F16", "shape": [320, 4, 3, 3], "data_offsets": [0, 23040]},
              "model.diffusion_model.conv_in.bias": {"dtype": "F16", "shape": [320], "data_offsets": [23040, 23680]},
              "model.diffusion_model.scale": {"dtype": "F32", "shape": [], "data_offsets": [23680, 23684]},
              "first_stage_model.decoder.conv_in.weight": {"dtype": "F32", "shape": [512, 4, 3, 3], "data_offsets": [23684, 97412]},
              "model.diffusion_model_ema.decay": {"dtype": "F32", "shape": [], "data_offsets": [97412, 97416]}}
    return [Case("a small header, prefix 'model.diffusion_model.'", (header, "model.diffusion_model.")),
            Case("the same header, prefix 'first_stage_model.'", (header, "first_stage_model.")),
            Case("the same header, a prefix no key has", (header, "cond_stage_model.")),
            Case("the same header, prefix '' (every tensor)", (header, ""))]


def _count_tensors(header, prefix):
    return sum(1 for k in header if k != "__metadata__" and k.startswith(prefix))


def _count_bytes(header, prefix):
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()
               if k != "__metadata__" and k.startswith(prefix))


def _count_summed_dims(header, prefix):
    return sum(sum(e["shape"]) for k, e in header.items() if k != "__metadata__" and k.startswith(prefix))


def _count_scalars_as_zero(header, prefix):
    return sum(math.prod(e["shape"]) if e["shape"] else 0 for k, e in header.items()
               if k != "__metadata__" and k.startswith(prefix))


register(Exercise(
    name="parameter_count", notebook="01_weights",
    reference=_count_reference, cases=_count_cases,
    mistakes=[Mistake("that is the number of tensors; a tensor holds as many parameters as the product of "
                      "its shape.", _count_tensors),
              Mistake("that counts bytes (the data_offsets span); parameters are elements: the product of "
                      "the shape, whatever the dtype.", _count_bytes),
              Mistake("a tensor's element count is the product of "
                      "its dimensions, not their sum.", _count_summed_dims),
              Mistake("a scalar (shape []) holds one number, not zero: "
                      "what does a product of no factors give?", _count_scalars_as_zero)],
    hint="which entries of the header are tensors, which of them start with the prefix, "
         "and how many numbers does a tensor of shape (320, 4, 3, 3) hold?"))
