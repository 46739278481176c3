"""SD v1.5's two checkpoint layouts, told apart and renamed into one another.

* the original CompVis single file: `model.diffusion_model.*` (UNet), `first_stage_model.*`
  (VAE), `cond_stage_model.transformer.text_model.*` (CLIP), plus schedule buffers;
* a diffusers folder: `model_index.json` and `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  each with its own `config.json` and safetensors file.

sdlearn's modules use the diffusers / transformers parameter names, so a diffusers folder loads
as it is and the original layout needs the rename rules below: a declarative list of (block in
sdlearn, block in the original file, renames inside the block), with the block indices of
CompVis' flat `input_blocks` / `output_blocks` lists computed from the config. One function
applies the rules in either direction. The VAE's mid-block attention is the one reshape: 1×1
conv weights [C, C, 1, 1] in the original file, linear [C, C] in sdlearn.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

from .configs import ConfigError, ModelConfig, UNetConfig, VAEConfig
from .safetensors_file import CheckpointError

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


def to_original_key(key: str, rules: list[Rule]) -> str | None:
    """sdlearn name → original name (without the component prefix); None if no rule applies.

    The rule with the longest matching block prefix renames the block, then the first matching
    inner rule the rest."""
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


def from_original_key(key: str, rules: list[Rule]) -> str | None:
    """Original name (without the component prefix) → sdlearn name; the inverse of the above."""
    return to_original_key(key, [(theirs, ours, [(b, a) for a, b in inner]) for ours, theirs, inner in rules])


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


# -- telling the layouts and their configurations apart ---------------------------------------

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
