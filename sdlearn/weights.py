"""Reading checkpoints: the safetensors format by hand, layouts, key renaming, loading.

A safetensors file is

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [raw tensor bytes …]

and the header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the first byte after the header), plus an optional "__metadata__" dict of
strings. Because the bytes are raw and contiguous, a tensor can be a *view* of a memory-mapped
file: nothing is read until it is used, and nothing is copied when dtype and device already match.

SD v1.5 comes in two layouts:

* the original CompVis single file: `model.diffusion_model.*` (UNet), `first_stage_model.*`
  (VAE), `cond_stage_model.transformer.text_model.*` (CLIP), plus schedule buffers;
* a diffusers folder: `model_index.json` and `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  each with its own `config.json` and safetensors file (`*.fp16.safetensors` variants).

sdlearn's modules use the diffusers / transformers parameter names, so a diffusers folder loads
as it is and the original layout needs the rename rules below (`UNET_RESNET`, …, plus block
indices computed from the config). Loading builds each module on the meta device (no memory)
and assigns the checkpoint tensors to it: the weights exist once, never twice.
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .configs import CLIPTextConfig, ConfigError, ModelConfig, UNetConfig, VAEConfig

COMPONENTS = ("text_encoder", "unet", "vae")
MAX_HEADER_BYTES = 100 * 2**20   # the safetensors library's own limit

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint sdlearn cannot load. The message names the file, what was expected, what
    was found and what to do."""


# ----------------------------------------------------------------------------------------------
# The safetensors format, by hand
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int          # byte offsets into the data section (after the header)
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int     # 8 + header length
    file_size: int


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file without reading any tensor data."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name}: file is {size} bytes; a safetensors file starts with an 8-byte "
                                      "header length. The file is empty or truncated: download it again")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{name}: header length field says {n:,} bytes (limit {MAX_HEADER_BYTES:,}); "
                                      "this is not a safetensors file or it is corrupted")
            if 8 + n > size:
                raise CheckpointError(f"{name}: header of {n:,} bytes does not fit in a {size:,}-byte file; "
                                      "the file is truncated or not safetensors: download it again")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot be read ({exc.strerror or exc.__class__.__name__}); "
                              "check the path and its permissions") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: JSON nested thousands deep ([[[[…), which no real header is.
        raise CheckpointError(f"{name}: header is not valid JSON ({exc.__class__.__name__}); "
                              "the file is not safetensors or it is corrupted") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{name}: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _tensor_info(name, key, entry, data_size)
    _check_no_overlap(name, tensors)
    return SafetensorsHeader(path, tensors, metadata, 8 + n, size)


def _tensor_info(name: str, key: str, entry, data_size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{name}: header entry for {key!r} needs dtype, shape and two data_offsets; "
                              f"found {str(entry)[:80]}") from None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{name}: tensor {key!r} has dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not all(isinstance(o, int) for o in (begin, end))):
        raise CheckpointError(f"{name}: tensor {key!r} has a malformed shape {shape!r} or offsets {[begin, end]!r}")
    info = TensorInfo(dtype, tuple(shape), begin, end)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"{name}: tensor {key!r} claims bytes {begin:,}…{end:,} but the data section "
                              f"has {data_size:,} bytes; the file is truncated: download it again")
    if info.nbytes != info.numel * itemsize:
        raise CheckpointError(f"{name}: tensor {key!r} of shape {list(shape)} {dtype} needs "
                              f"{info.numel * itemsize:,} bytes but its offsets span {info.nbytes:,}")
    return info


def _check_no_overlap(name: str, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.begin, t.end, k) for k, t in tensors.items() if t.nbytes)
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{name}: tensors {k0!r} and {k1!r} overlap in the file; it is corrupted")


class SafetensorsFile:
    """A memory-mapped safetensors file: `f[key]` is a tensor that views the file's bytes.

    The map is private copy-on-write, so the tensors are writable without touching the file and
    pages are read from disk only when first used.
    """

    def __init__(self, path: str | os.PathLike):
        self.header = read_safetensors_header(path)
        self.path = self.header.path
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self.header.file_size else None

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def __contains__(self, key: str) -> bool:
        return key in self.header.tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.header.tensors[key]
        dtype = DTYPES[info.dtype]
        offset = self.header.data_start + info.begin
        itemsize = torch.empty((), dtype=dtype).element_size()
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        if offset % itemsize:   # unaligned: torch needs aligned views, so copy this one
            return torch.frombuffer(bytearray(self._map[offset:offset + info.nbytes]), dtype=dtype).view(info.shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns about non-writable buffers; ours is COW
            return torch.frombuffer(self._map, dtype=dtype, count=info.numel, offset=offset).view(info.shape)

    def sum_unmapped(self, key: str, chunk: int = 1 << 24) -> torch.Tensor:
        """The sum of a tensor's values (in its own dtype), read with ordinary file reads rather
        than through the map: checking a whole checkpoint for NaN/inf this way leaves its pages
        out of this process's resident memory until the model really uses them (the VAE encoder
        of a text-to-image run never does). `chunk` bytes at a time, through one reused buffer."""
        info = self.header.tensors[key]
        dtype = DTYPES[info.dtype]
        buf = bytearray(min(chunk, max(info.nbytes, 1)))
        sums = [torch.zeros((), dtype=dtype)]
        with open(self.path, "rb") as f:
            f.seek(self.header.data_start + info.begin)
            left = info.nbytes
            while left:
                n = f.readinto(memoryview(buf)[:min(left, len(buf))])
                if not n:
                    raise CheckpointError(f"{self.path.name}: ends inside tensor {key!r}; the file is truncated")
                sums.append(torch.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize).sum())
                left -= n
        return torch.stack(sums).sum()


# ----------------------------------------------------------------------------------------------
# The original CompVis layout ↔ sdlearn (= diffusers / transformers) names
# ----------------------------------------------------------------------------------------------

PREFIX = {  # component → prefix of its keys in the original single file
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}

# Inside a block, sdlearn name → original name (applied to the start of the rest of the key).
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
# Spatial transformers (norm, proj_in, transformer_blocks.*, proj_out) have the same names in both.

Rule = tuple[str, str, list]   # (sdlearn block prefix, original block prefix, rules inside the block)


def unet_block_rules(cfg: UNetConfig) -> list[Rule]:
    """Where each diffusers block sits in CompVis' flat `input_blocks` / `output_blocks` lists.

    input_blocks[0] is conv_in; then per level `layers_per_block` × (ResBlock [+ transformer]),
    then a downsampler except at the last level. output_blocks: per level (deepest first)
    `layers_per_block + 1` × (ResBlock [+ transformer] [+ upsampler after the last one]).
    """
    levels, n = len(cfg.block_out_channels), cfg.layers_per_block
    rules: list[Rule] = [("time_embedding.linear_1", "time_embed.0", []),
                         ("time_embedding.linear_2", "time_embed.2", []),
                         ("conv_in", "input_blocks.0.0", []),
                         ("conv_norm_out", "out.0", []), ("conv_out", "out.2", []),
                         ("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
                         ("mid_block.attentions.0", "middle_block.1", []),
                         ("mid_block.resnets.1", "middle_block.2", UNET_RESNET)]
    for i in range(levels):
        for j in range(n):
            idx = 1 + i * (n + 1) + j
            rules.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", UNET_RESNET))
            if cfg.attention_levels[i]:
                rules.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", []))
        if i < levels - 1:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (n + 1) + n}.0.op", []))
    for i in range(levels):
        attn = cfg.attention_levels[levels - 1 - i]
        for j in range(n + 1):
            idx = i * (n + 1) + j
            rules.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", UNET_RESNET))
            if attn:
                rules.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", []))
        if i < levels - 1:
            rules.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (n + 1) + n}.{2 if attn else 1}.conv", []))
    return rules


def vae_block_rules(cfg: VAEConfig) -> list[Rule]:
    """CompVis numbers the decoder's `up` list from the *lowest* resolution's index upwards in
    reverse (up[L-1] runs first); diffusers numbers up_blocks in the order they run."""
    levels = len(cfg.block_out_channels)
    rules: list[Rule] = [("quant_conv", "quant_conv", []), ("post_quant_conv", "post_quant_conv", [])]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in", f"{part}.conv_in", []), (f"{part}.conv_out", f"{part}.conv_out", []),
                  (f"{part}.conv_norm_out", f"{part}.norm_out", []),
                  (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET),
                  (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION),
                  (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)]
    for i in range(levels):
        for j in range(cfg.layers_per_block):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET))
        if i < levels - 1:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", []))
        for j in range(cfg.layers_per_block + 1):
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}", VAE_RESNET))
        if i < levels - 1:
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{levels - 1 - i}.upsample.conv", []))
    return rules


def block_rules(component: str, config: ModelConfig) -> list[Rule]:
    if component == "unet":
        return unet_block_rules(config.unet)
    if component == "vae":
        return vae_block_rules(config.vae)
    return [("text_model", "text_model", [])]


def _rename(key: str, rules: list[tuple[str, str, list]]) -> str | None:
    """Apply the rule with the longest matching block prefix, then the first matching inner rule."""
    best = None
    for src, dst, inner in rules:
        if (key == src or key.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst, inner)
    if best is None:
        return None
    src, dst, inner = best
    rest = key[len(src) + 1:]
    for a, b in inner:
        if rest.startswith(a + "."):
            rest = b + rest[len(a):]
            break
    return f"{dst}.{rest}" if rest else dst


def to_original_key(key: str, rules: list[Rule]) -> str | None:
    """sdlearn name → original name (without the component prefix); None if no rule applies."""
    return _rename(key, rules)


def from_original_key(key: str, rules: list[Rule]) -> str | None:
    """Original name (without the component prefix) → sdlearn name; the inverse of the above."""
    return _rename(key, [(theirs, ours, [(b, a) for a, b in inner]) for ours, theirs, inner in rules])


def original_key_map(component: str, keys: Iterable[str], config: ModelConfig) -> dict[str, str]:
    """{sdlearn key: key in the original single file (with its component prefix)}."""
    rules = block_rules(component, config)
    out = {}
    for k in keys:
        orig = to_original_key(k, rules)
        if orig is not None:
            out[k] = PREFIX[component] + orig
    return out


def is_vae_attention_matrix(key: str) -> bool:
    """The VAE mid-block attention's q, k, v, out are 1×1 convs [C, C, 1, 1] in the original
    file and linear layers [C, C] in sdlearn/diffusers."""
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key))


def to_original_layout(state_dicts: dict[str, dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """sdlearn state dicts {component: state_dict} → one dict in the original single-file layout."""
    out = {}
    for comp, sd in state_dicts.items():
        mapping = original_key_map(comp, sd, config)
        unmapped = sorted(set(sd) - set(mapping))
        if unmapped:
            raise KeyError(f"{comp}: no original name for {unmapped[:5]}")
        for k, t in sd.items():
            out[mapping[k]] = t[:, :, None, None] if comp == "vae" and is_vae_attention_matrix(k) else t
    return out


def save_original_checkpoint(path: str | os.PathLike, models: dict[str, torch.nn.Module], config: ModelConfig,
                             dtype: torch.dtype | None = None, extra_metadata: dict[str, str] | None = None,
                             store_config: bool = True) -> Path:
    """Write models {"text_encoder", "unet", "vae"} as one original-layout safetensors file, with
    the sdlearn config in its metadata (unless store_config=False: then, like a real SD v1.x
    file, it is recognised as SD v1.5 by its shapes). Refuses to overwrite an existing file and
    writes through a temporary file, so an interrupted save leaves nothing half-written."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it first or choose another name")
    sds = {c: {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
               for k, v in m.state_dict().items()} for c, m in models.items()}
    meta = {"format": "pt", **(extra_metadata or {})}
    if store_config:
        meta["sdlearn_config"] = json.dumps(config.to_dict())
    tmp = path.with_name(path.name + ".partial")
    save_file(to_original_layout(sds, config), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Layout detection
# ----------------------------------------------------------------------------------------------

def detect_layout(keys: Iterable[str], name: str) -> str:
    """Return "original" for an SD v1.x single file; raise a one-line CheckpointError for
    anything else, saying what the file looks like."""
    keys = list(keys)
    if not keys:
        raise CheckpointError(f"{name}: holds no tensors; expected an SD v1.x checkpoint")
    has = lambda p: any(k.startswith(p) for k in keys)
    if has("conditioner."):
        raise CheckpointError(f"{name} looks like an SDXL checkpoint (found conditioner.embedders.*); "
                              "sdlearn loads SD v1.x only")
    if has("cond_stage_model.model."):
        raise CheckpointError(f"{name} looks like an SD 2.x checkpoint (found the OpenCLIP text encoder "
                              "cond_stage_model.model.*); sdlearn loads SD v1.x only")
    if any("lora" in k.lower() for k in keys[:2000]):
        raise CheckpointError(f"{name} looks like a LoRA (found keys such as {next(k for k in keys if 'lora' in k.lower())!r}); "
                              "it holds only weight deltas: load a full SD v1.x checkpoint instead")
    if has("model.diffusion_model."):
        missing = [p for c, p in PREFIX.items() if not has(p)]
        if missing:
            raise CheckpointError(f"{name}: an SD v1.x file but without {', '.join(missing)}*; "
                                  "sdlearn needs UNet, VAE and text encoder in one file (or a diffusers folder)")
        return "original"
    if has("encoder.") and has("decoder.") and not has("model."):
        raise CheckpointError(f"{name} looks like a VAE-only file (encoder.*, decoder.*); "
                              "sdlearn needs a full SD v1.x checkpoint")
    if has("down_blocks.") or has("text_model.") or has("encoder.layers."):
        raise CheckpointError(f"{name} looks like one component of a diffusers folder; "
                              "pass the folder that holds model_index.json instead")
    raise CheckpointError(f"{name}: not an SD v1.x checkpoint (first keys: {', '.join(sorted(keys)[:3])}); "
                          "expected model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*")


def infer_original_config(keys_shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], name: str) -> ModelConfig:
    """The config of an original-layout file: from its metadata if sdlearn wrote it, else SD v1.5
    after checking the shapes that tell SD versions apart."""
    if "sdlearn_config" in metadata:
        try:
            config = ModelConfig.from_dict(json.loads(metadata["sdlearn_config"]))
        except (json.JSONDecodeError, RecursionError, ConfigError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{name}: its sdlearn_config metadata is invalid ({exc.__class__.__name__}: "
                                  f"{str(exc)[:160]})") from None
        return check_config(config, f"{name}: its sdlearn_config metadata")
    cfg = ModelConfig.sd15()
    conv_in = keys_shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] == 9:
        raise CheckpointError(f"{name} is an SD inpainting checkpoint (UNet with 9 input channels); "
                              "sdlearn loads the standard 4-channel SD v1.x models: use a standard "
                              "checkpoint and pass mask= to generate() for inpainting")
    to_k = keys_shapes.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and len(to_k) == 2 and to_k[-1] != 768:
        raise CheckpointError(f"{name}: the UNet's cross-attention reads {to_k[-1]}-wide text features; "
                              "SD v1.x uses 768 (CLIP ViT-L/14): this is another model family")
    return cfg


# Bounds on a configuration read from a file: generous for any SD v1.x-like model, small enough
# that building it on the meta device takes milliseconds, not forever.
MAX_COUNT = {"num_hidden_layers": 64, "layers_per_block": 16, "transformer_layers_per_block": 16}
MAX_WIDTH, MAX_LEVELS = 1 << 16, 8


def check_config(config: ModelConfig, where: str) -> ModelConfig:
    """Refuse a configuration read from a file (metadata, config.json) that no module could be
    built from: a field of the wrong type, a size ≤ 0, counts so large that building would hang,
    widths that do not split into heads. Each field has the type of its default: int, float, or a
    tuple (1 to 8 levels) of ints or bools."""
    for part in (config.text_encoder, config.unet, config.vae):
        for f in dataclasses.fields(part):
            value, default = getattr(part, f.name), f.default
            levels = isinstance(default, tuple)
            kind = type(default[0] if levels else default)
            limit = MAX_COUNT.get(f.name, MAX_WIDTH)
            ok = (isinstance(value, tuple) and 0 < len(value) <= MAX_LEVELS if levels else True) \
                and all(_field_ok(v, kind, limit) for v in (value if levels else (value,)))
            if not ok:
                raise CheckpointError(f"{where}: {type(part).__name__}.{f.name} is {str(value)[:60]!r}; expected "
                                      f"{f'1 to {MAX_LEVELS} levels of ' if levels else ''}{kind.__name__}"
                                      f"{'' if kind is bool else f' in (0, {limit}]'} such as {default!r}")
    te, u = config.text_encoder, config.unet
    if te.hidden_size % te.num_attention_heads or any(c % u.num_heads for c in u.block_out_channels):
        raise CheckpointError(f"{where}: attention widths must split evenly into heads; found text encoder "
                              f"{te.hidden_size} / {te.num_attention_heads} heads, UNet "
                              f"{list(u.block_out_channels)} / {u.num_heads} heads")
    return config


def _field_ok(v, kind: type, limit: int) -> bool:
    if kind is bool:
        return isinstance(v, bool)
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        return False
    return 0 < v <= limit and math.isfinite(v)


# ----------------------------------------------------------------------------------------------
# Opening a checkpoint (file or diffusers folder) into lazily read, renamed tensors
# ----------------------------------------------------------------------------------------------

Getter = Callable[[], torch.Tensor]


class _Stored:
    """The getter of one tensor of an opened file: calling it gives the tensor (a view of the
    memory map, or from a loaded pickle); `sum_unmapped()` sums it without mapping its pages, for
    safetensors files (None for others)."""

    def __init__(self, f, key: str):
        self.f, self.key = f, key

    def __call__(self) -> torch.Tensor:
        return self.f[self.key]

    def sum_unmapped(self) -> torch.Tensor | None:
        return self.f.sum_unmapped(self.key) if isinstance(self.f, SafetensorsFile) else None


@dataclass
class Checkpoint:
    """What a source holds, with every tensor under its sdlearn name, read only when asked."""
    source: str
    layout: str                                   # "original" or "diffusers"
    config: ModelConfig
    tensors: dict[str, dict[str, Getter]]         # component → sdlearn key → getter
    shapes: dict[str, dict[str, tuple[int, ...]]]  # component → sdlearn key → shape as stored
    dtypes: dict[str, dict[str, str]]             # component → sdlearn key → stored dtype name
    other: dict[str, tuple[int, ...]] = field(default_factory=dict)  # keys of no component
    unexpected: dict[str, list[str]] = field(default_factory=dict)    # component → unknown keys
    metadata: dict[str, str] = field(default_factory=dict)
    tokenizer_folder: Path | None = None   # a diffusers tokenizer/ (vocab.json + merges.txt or tokenizer.json)


class _TorchPickle:
    """A .ckpt/.pt state dict loaded with weights_only=True (no code can run) and mmap."""

    def __init__(self, path: Path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise CheckpointError(f"{path.name}: torch.load failed ({str(exc).splitlines()[0][:160]})") from None
            obj = self._load_unmapped(path)
        except Exception as exc:   # UnpicklingError and friends: the pickle wants to run code
            raise CheckpointError(
                f"{path.name}: refused to load; this pickle needs code beyond plain tensors "
                f"({exc.__class__.__name__}), and loading it could run that code. Convert it to "
                ".safetensors with a tool you trust, or use a .safetensors file") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
            raise CheckpointError(f"{path.name}: expected a dict of tensors by name (a state_dict), found "
                                  f"{type(obj).__name__} with other content")
        self.sd = obj

    @staticmethod
    def _load_unmapped(path: Path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path.name}: refused to load ({exc.__class__.__name__}); only plain "
                                  "tensor pickles are accepted (weights_only=True)") from None

    def keys(self):
        return list(self.sd)

    def __getitem__(self, key):
        return self.sd[key]


def _open_tensor_file(path: Path):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _TorchPickle(path)
    raise CheckpointError(f"{path.name}: unknown file type {path.suffix!r}; expected .safetensors "
                          "(or .ckpt/.pt, loaded with weights_only=True)")


def _shape_dtype(f, key: str) -> tuple[tuple[int, ...], str]:
    if isinstance(f, SafetensorsFile):
        info = f.header.tensors[key]
        return info.shape, info.dtype
    t = f[key]
    return tuple(t.shape), str(t.dtype).replace("torch.", "")


def open_checkpoint(source: str | os.PathLike, config: ModelConfig | None = None) -> Checkpoint:
    """Open a single file (original layout) or a diffusers folder. Reads headers only.

    An original-layout file's architecture comes from `config` if given, else from the
    `sdlearn_config` metadata sdlearn writes, else it is taken to be SD v1.5."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected an SD v1.x .safetensors file, "
                              "a diffusers folder, \"tiny\" or a Hugging Face repo id")
    if path.is_dir():
        return _open_diffusers_folder(path)
    return _open_single_file(path, config)


def _open_single_file(path: Path, config: ModelConfig | None = None) -> Checkpoint:
    f = _open_tensor_file(path)
    keys = f.keys()
    layout = detect_layout(keys, path.name)
    shapes_all = {k: _shape_dtype(f, k) for k in keys}
    metadata = f.metadata if isinstance(f, SafetensorsFile) else {}
    if config is None:
        config = infer_original_config({k: s for k, (s, _) in shapes_all.items()}, metadata, path.name)
    ckpt = Checkpoint(str(path), layout, config, {}, {}, {}, metadata=dict(metadata))
    used = set()
    for comp in COMPONENTS:
        prefix = PREFIX[comp]
        for orig in keys:
            if not orig.startswith(prefix):
                continue
            used.add(orig)
            rest = orig[len(prefix):]
            if comp == "text_encoder" and rest.endswith("position_ids"):
                continue   # rebuilt as arange(77); merged files sometimes store corrupted floats
            ours = _from_original(comp, rest, config)
            if ours is None:
                ckpt.unexpected.setdefault(comp, []).append(orig)
                continue
            _add(ckpt, comp, ours, _Stored(f, orig), *shapes_all[orig])
    ckpt.other = {k: shapes_all[k][0] for k in keys if k not in used}
    return ckpt


def _from_original(component: str, key: str, config: ModelConfig) -> str | None:
    """Original name (without prefix) → sdlearn name; None for a key no rule covers."""
    return from_original_key(key, block_rules(component, config))


def _add(ckpt: Checkpoint, comp: str, key: str, getter: Getter, shape, dtype) -> None:
    ckpt.tensors.setdefault(comp, {})[key] = getter
    ckpt.shapes.setdefault(comp, {})[key] = tuple(shape)
    ckpt.dtypes.setdefault(comp, {})[key] = dtype


DIFFUSERS_FILES = {
    "unet": ["diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"],
    "vae": ["diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"],
    "text_encoder": ["model{v}.safetensors", "pytorch_model{v}.bin"],
}


def _diffusers_weight_file(folder: Path, comp: str, prefer_fp16: bool) -> Path:
    variants = ["", ".fp16"] if not prefer_fp16 else [".fp16", ""]
    for v in variants:
        for pattern in DIFFUSERS_FILES[comp]:
            p = folder / comp / pattern.format(v=v)
            if p.exists():
                return p
    raise CheckpointError(f"{folder.name}: component {comp}/ has no weights (looked for "
                          f"{', '.join(p.format(v='') for p in DIFFUSERS_FILES[comp])} and .fp16 variants)")


def _open_diffusers_folder(folder: Path, prefer_fp16: bool = False) -> Checkpoint:
    if not (folder / "model_index.json").exists():
        raise CheckpointError(f"{folder}: a folder without model_index.json; expected a diffusers "
                              "folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/)")
    missing = [c for c in COMPONENTS if not (folder / c / "config.json").exists()]
    if missing:
        raise CheckpointError(f"{folder.name}: diffusers folder lacks {', '.join(c + '/config.json' for c in missing)}; "
                              "download the missing component(s) again")
    configs = {}
    for comp in COMPONENTS:
        try:
            configs[comp] = json.loads((folder / comp / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{folder.name}/{comp}/config.json is not valid JSON ({exc})") from None
        if not isinstance(configs[comp], dict):
            raise CheckpointError(f"{folder.name}/{comp}/config.json holds a JSON {type(configs[comp]).__name__}; "
                                  "expected an object")
    parts = {}
    for comp, cls in (("text_encoder", CLIPTextConfig), ("unet", UNetConfig), ("vae", VAEConfig)):
        try:
            parts[comp] = cls.from_diffusers(configs[comp])
        except (ConfigError, TypeError, ValueError) as exc:   # TypeError: a field of the wrong kind
            raise CheckpointError(f"{folder.name}/{comp}/config.json: {exc}") from None
    config = check_config(ModelConfig(**parts), f"{folder.name}: its config.json files")
    if config.unet.in_channels == 9:
        raise CheckpointError(f"{folder.name} holds an SD inpainting UNet (9 input channels); sdlearn loads "
                              "the standard 4-channel SD v1.x models: use a standard one and pass mask=")
    ckpt = Checkpoint(str(folder), "diffusers", config, {}, {}, {})
    for comp in COMPONENTS:
        f = _open_tensor_file(_diffusers_weight_file(folder, comp, prefer_fp16))
        for k in f.keys():
            if comp == "text_encoder" and k.endswith("position_ids"):
                continue
            ours = k
            if comp == "text_encoder" and not k.startswith("text_model."):
                ours = "text_model." + k      # transformers 5 saves CLIPTextModel without the prefix
            _add(ckpt, comp, ours, _Stored(f, k), *_shape_dtype(f, k))
    tok = folder / "tokenizer"
    if ((tok / "vocab.json").exists() and (tok / "merges.txt").exists()) or (tok / "tokenizer.json").exists():
        ckpt.tokenizer_folder = tok
    return ckpt


# ----------------------------------------------------------------------------------------------
# Building modules from a checkpoint
# ----------------------------------------------------------------------------------------------

def model_class(component: str):
    if component == "unet":
        from .unet import UNet
        return UNet
    if component == "vae":
        from .vae import AutoencoderKL
        return AutoencoderKL
    if component == "text_encoder":
        from .clip import CLIPTextModel
        return CLIPTextModel
    raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


def component_config(component: str, config: ModelConfig):
    return getattr(config, component)


def build_empty(component: str, config: ModelConfig) -> torch.nn.Module:
    """The module with parameters on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return model_class(component)(component_config(component, config))


def expected_keys(component: str, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build_empty(component, config).state_dict().items()}


def load_component(ckpt: Checkpoint, component: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build one module on the meta device and assign the checkpoint's tensors to it, each cast
    to `dtype` and moved to `device` as it is read. Raises CheckpointError listing missing keys
    and wrong shapes; unexpected keys, and tensors holding NaN or ±inf, are reported as warnings."""
    name = Path(ckpt.source).name
    try:
        model = build_empty(component, ckpt.config)
    except Exception as exc:   # the config is the only input: say which one cannot be built, and why
        raise CheckpointError(f"{name}: its configuration does not describe a buildable {component} "
                              f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = ckpt.tensors.get(component, {})
    missing = sorted(set(expected) - set(have))
    if missing:
        raise CheckpointError(f"{name}: {component} is missing {len(missing)} tensor(s): "
                              f"{', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}; the file is incomplete "
                              "or holds another architecture: download it again")
    unexpected = sorted(set(have) - set(expected)) + ckpt.unexpected.get(component, [])
    if unexpected:
        warnings.warn(f"{name}: {component} has {len(unexpected)} tensor(s) sdlearn does not use: "
                      f"{', '.join(unexpected[:6])}{' …' if len(unexpected) > 6 else ''}", stacklevel=2)
    bad = []
    for k, shape in expected.items():
        stored = ckpt.shapes[component][k]
        if stored != shape and not (is_vae_attention_matrix(k) and stored == shape + (1, 1)):
            bad.append(f"{k} {list(stored)} (expected {list(shape)})")
        elif not ckpt.dtypes[component][k].upper().startswith(("F", "BF", "FLOAT", "BFLOAT")):
            bad.append(f"{k} has dtype {ckpt.dtypes[component][k]} (expected a float type)")
    if bad:
        raise CheckpointError(f"{name}: {component} tensors of the wrong shape or dtype: {'; '.join(bad[:4])}"
                              f"{' …' if len(bad) > 4 else ''}. Is this an SD v1.x checkpoint?")
    state, sums = {}, []
    for k, shape in expected.items():
        t = have[k]()
        if t.shape != shape:
            t = t.reshape(shape)     # 1×1 conv → linear
        state[k] = t.to(device=device, dtype=dtype)
        # One fast pass: NaN or ±inf anywhere makes the sum non-finite. A tensor that is still the
        # file's bytes is summed from ordinary reads of the file (its pages stay out of resident
        # memory until a model uses them); a cast or moved one is summed as it now is (a float16
        # overflow shows there).
        as_stored = state[k].data_ptr() == t.data_ptr()
        from_file = have[k].sum_unmapped() if as_stored and isinstance(have[k], _Stored) else None
        sums.append(state[k].sum() if from_file is None else from_file)
    warn_nonfinite(name, component, state, have, sums)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def warn_nonfinite(name: str, component: str, state: dict[str, torch.Tensor], stored: dict[str, Getter],
                   sums: list[torch.Tensor]) -> None:
    """Warn naming the tensors that hold NaN or ±inf: a broken merge or conversion in the file,
    or values too large for the dtype they were cast to (float16 ends at 65504).

    Each tensor's sum was taken as it was loaded (one read, no copy, one device sync here), in
    its own dtype: summing float16 into float32 is 15× slower on the CPU. A non-finite sum can also
    come from large finite values (a float16 sum ends at 65504), so those tensors are checked exactly."""
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return
    bad = [k for k, s in zip(state, sums) if not torch.isfinite(s) and not torch.isfinite(state[k]).all()]
    if not bad:
        return
    in_file = [k for k in bad if not torch.isfinite(stored[k]().float()).all()]
    listed = ", ".join(bad[:6]) + (" …" if len(bad) > 6 else "")
    why = ("the file holds them (a broken merge or conversion): get another copy of it" if in_file else
           f"they overflow {str(state[bad[0]].dtype).replace('torch.', '')}: load it with dtype=torch.float32")
    warnings.warn(f"{name}: {component} has NaN or infinite values in {len(bad)} tensor(s): {listed}; {why}. "
                  "Pictures made with it will be black or noise", stacklevel=3)


# ----------------------------------------------------------------------------------------------
# A summary (what `sdlearn info` prints)
# ----------------------------------------------------------------------------------------------

def summarize(ckpt: Checkpoint) -> dict[str, dict]:
    """Per component: tensors, parameters, dtypes and bytes as stored."""
    out = {}
    for comp in COMPONENTS:
        shapes, dtypes = ckpt.shapes.get(comp, {}), ckpt.dtypes.get(comp, {})
        params = sum(_numel(s) for s in shapes.values())
        nbytes = sum(_numel(s) * _itemsize(dtypes[k]) for k, s in shapes.items())
        out[comp] = {"tensors": len(shapes), "parameters": params, "dtypes": sorted(set(dtypes.values())),
                     "bytes": nbytes}
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    d = DTYPES.get(dtype) or getattr(torch, dtype, None)
    return torch.empty((), dtype=d).element_size() if d is not None else 0
