"""LoRA: low-rank weight updates, read from the files SD v1.5 users share and fused into the weights.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") changes a layer
y = W x by a matrix of rank r ≪ min(out, in), stored as two thin factors:

    W' = W + s · (α / r) · B A          A = down (r, in),  B = up (out, r),  s = the user's scale

α is the file's `alpha` (absent: α = r, a factor of 1). For a convolution (LoCon files) A is a
k×k conv (r, in, k, k) and B a 1×1 conv (out, r, 1, 1): B A, computed on the flattened kernels
(out, r) @ (r, in·k·k), is again an (out, in, k, k) kernel, so the same formula holds.

The two formats in use for SD v1.x (`read` tells them apart by their key names):

    kohya / web UI   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                     lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight, ….alpha
    diffusers/PEFT   unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight (lora_B),
                     text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight;
                     older diffusers files: ….lora.down.weight, ….processor.to_q_lora.down.weight

A kohya name is a module's name with "." → "_" (kohya's sd-scripts trains SD v1.x on diffusers'
UNet, whose module names sdlearn shares), so `kohya_names` builds the map from the model's own
modules; files written against the original CompVis layout (lora_unet_input_blocks_1_1_proj_in)
are mapped through the same rename rules as checkpoints (`sdlearn.layouts`).

**Fused, not a side path.** `load` replaces each targeted weight by W + ΔW (a new tensor) and
keeps a reference to the original W; `unload` puts the originals back: the very same tensors,
so the restore is bit-exact. The alternative, a side path y = W x + s·(α/r)·B(A x) in every
targeted layer, would cost two extra thin matrix products per layer per call and a wrapper
around every layer (around fast_cpu's layers too). Fused, a LoRA costs nothing per step, and
every layer — plain, or sdlearn.fast_cpu's oneDNN ones, which read `self.weight` on every call —
sees the new weight without knowing about LoRA. Subtracting ΔW again to unload would not give W
back bit for bit (float rounding), hence the kept reference. What that reference costs:

* CPU, float32 (as loaded by default): each weight is a view of the memory-mapped checkpoint, so
  the reference costs no memory; the fused weights are the only new memory (one copy of each
  targeted layer, which any fused LoRA needs);
* GPU, or a dtype other than the file's: the weights are the only copy, so an original kept on
  the device would double the targeted layers' memory there. The originals are moved to the
  CPU instead (host memory, not GPU memory) and copied back on unload: still bit-exact.
* float16: ΔW is computed in float32, added to W in float32 and rounded to float16 once, so a
  fused weight differs from diffusers' side path by float16 rounding (about 1e-3 relative) —
  the same as diffusers' own `fuse_lora`.

Loading a second LoRA adds its ΔW to the already fused weight; `unload` removes every LoRA.
The same file loaded twice is therefore applied twice (2·ΔW): allowed, with a warning.

    pipe.load_lora("outline.safetensors", scale=0.8)     # = lora.load(pipe, path, scale)
    pipe.unload_lora()                                   # = lora.unload(pipe)
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import open_tensor_file
from .layouts import to_original_key, unet_block_rules
from .safetensors_file import CheckpointError

COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
PEFT_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder."}

# Key ending → which tensor of a LoRA layer it holds ("down" = A, "up" = B), in every format.
SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),                  # kohya
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),                      # PEFT
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),                  # diffusers
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),                  # diffusers' old attention
    # processors (…attn1.processor.to_q_lora.down.weight), renamed by OLD_NAMES
    (".alpha", "alpha"),
)
# Old diffusers attention-processor names (…attn1.processor.to_q_lora) → module names.
OLD_NAMES = ((r"_lora$", ""), (r"\.processor\.", "."), (r"(attn\d)\.to_out$", r"\1.to_out.0"),
             (r"self_attn\.to_([qkv])$", r"self_attn.\1_proj"), (r"self_attn\.to_out$", "self_attn.out_proj"))
OTHER_FAMILIES = ("lora_te1_", "lora_te2_", "text_encoder_2.")      # SDXL's second text encoder
NOT_LORA = {"hada_w1_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "dora_scale": "DoRA", ".diff": "LyCORIS full-diff"}


class LoRAError(CheckpointError):
    """A LoRA file that does not fit the model, or is not a LoRA file."""


@dataclass
class LoRALayer:
    """One layer's update: ΔW = s · (α/r) · up @ down (formats differ in names only)."""
    down: torch.Tensor              # A: (r, in) or (r, in, k, k)
    up: torch.Tensor                # B: (out, r) or (out, r, 1, 1)
    alpha: float | None = None      # None: α = r

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoRAFile:
    """What `read` found: the format and, per module *as the file names it*, its LoRALayer."""
    name: str
    format: str                          # "kohya" or "diffusers"
    layers: dict[str, LoRALayer]         # file's module name (suffix removed) → layer
    metadata: dict[str, str]


# ----------------------------------------------------------------------------------- the formula

def check_rank(down: torch.Tensor, up: torch.Tensor, name: str = "a LoRA layer") -> int:
    """r, the rank both factors must share: down (r, in…) and up (out, r…); else a LoRAError."""
    r = down.shape[0]
    if up.shape[1] != r:
        raise LoRAError(f"{name} has a rank mismatch: down {tuple(down.shape)} (rank {r}) but up "
                        f"{tuple(up.shape)} (rank {up.shape[1]})")
    return r


def check_scale(scale) -> float:
    """The user's scale s as a float: a finite real number (int or float, not bool); else a
    TypeError or ValueError, raised before anything changes."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number such as 0.8 (int or float); got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number such as 0.8; got {scale}")
    return float(scale)


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None, scale: float = 1.0) -> torch.Tensor:
    """ΔW = scale · (α / r) · up @ down, in float32.

    down (r, in) and up (out, r) → (out, in); conv kernels down (r, in, k, k) and up
    (out, r, 1, 1) → (out, in, k, k). alpha None means α = r."""
    r = check_rank(down, up)
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise LoRAError(f"an up conv of kernel {tuple(up.shape[2:])}: only 1×1 up convs (LoCon) are supported")
    factor = scale * (r if alpha is None else alpha) / r
    delta = up.flatten(1).float() @ down.flatten(1).float()              # (out, in·k·k)
    return factor * delta.view(up.shape[0], *down.shape[1:])


# ----------------------------------------------------------------------------------- names

def kohya_name(component: str, module: str) -> str:
    """("unet", "down_blocks.0.attentions.0.proj_in") → "lora_unet_down_blocks_0_attentions_0_proj_in"."""
    return KOHYA_PREFIX[component] + module.replace(".", "_")


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA can target: every nn.Linear and nn.Conv2d (fast_cpu's subclasses too)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def kohya_names(pipe) -> dict[str, tuple[str, str]]:
    """{kohya name: (component, module name)} for every layer of the pipeline a LoRA can target,
    also under the UNet's original CompVis names (lora_unet_input_blocks_1_1_proj_in)."""
    rules = unet_block_rules(pipe.unet.config)
    names = {}
    for comp in COMPONENTS:
        for module in lora_modules(getattr(pipe, comp)):
            names[kohya_name(comp, module)] = (comp, module)
            original = to_original_key(module + ".weight", rules) if comp == "unet" else None   # rules rename keys
            if original is not None:
                names.setdefault(kohya_name(comp, original.removesuffix(".weight")), (comp, module))
    return names


def peft_module(name: str) -> tuple[str, str] | None:
    """"unet.down_blocks.0….to_q" → ("unet", "down_blocks.0….to_q"); the text encoder's names with
    or without transformers' `text_model.`; None for names of neither component."""
    for comp, prefix in PEFT_PREFIX.items():
        if name.startswith(prefix):
            module = name[len(prefix):]
            if comp == "text_encoder" and not module.startswith("text_model."):
                module = "text_model." + module
            return comp, module
    return None


# ----------------------------------------------------------------------------------- reading

def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A .safetensors file (memory-mapped) or a .pt/.bin/.ckpt (weights_only) → (tensors, metadata)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoRAError(f"{path}: no such file; expected a LoRA .safetensors (or .pt) file")
    f = open_tensor_file(path)
    return {k: f[k] for k in f.keys()}, dict(getattr(f, "metadata", {}) or {})


def parse(tensors: dict[str, torch.Tensor], name: str = "LoRA", metadata: dict[str, str] | None = None) -> LoRAFile:
    """Group a LoRA state dict by module: {file's module name: LoRALayer}; raise LoRAError for a
    file of another model family or no LoRA at all."""
    keys = list(tensors)
    for prefix in OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in keys):
            raise LoRAError(f"{name} is a LoRA for SDXL (found {prefix}… keys: SDXL's two text encoders); "
                            "sdlearn loads LoRAs for SD v1.x only")
    for marker, kind in NOT_LORA.items():
        if any(k.endswith(marker) for k in keys):
            raise LoRAError(f"{name} is a {kind} file (found {marker} keys); sdlearn loads plain LoRA/LoCon files")
    parts: dict[str, dict] = {}
    for k in keys:
        suffix, role = next(((s, r) for s, r in SUFFIXES if k.endswith(s)), (None, None))
        if suffix is None:
            continue
        module = k[:-len(suffix)]
        if not module.startswith(tuple(KOHYA_PREFIX.values())):
            for pattern, repl in OLD_NAMES:
                module = re.sub(pattern, repl, module)
        parts.setdefault(module, {})[role] = tensors[k]
    if not any("down" in p for p in parts.values()):
        hint = "; it is a full checkpoint: load it with sdlearn.load_pipeline" if any(
            k.startswith("model.diffusion_model.") for k in keys) else ""
        raise LoRAError(f"{name}: not a LoRA file (no …lora_down/lora_A weights among {len(keys)} tensors, "
                        f"first: {', '.join(sorted(keys)[:3]) or 'none'}){hint}")
    unknown = sorted(set(keys) - {k for k in keys if any(k.endswith(s) for s, _ in SUFFIXES)})
    if unknown:
        raise LoRAError(f"{name}: {len(unknown)} tensor(s) that are not LoRA down/up/alpha weights: "
                        f"{', '.join(unknown[:3])}; expected kohya (lora_down/lora_up/alpha) or PEFT (lora_A/lora_B) keys")
    layers = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoRAError(f"{name}: {module} has {' and '.join(sorted(p))} but no "
                            f"{'up' if 'down' in p else 'down'} weight; the file is incomplete")
        layers[module] = LoRALayer(p["down"], p["up"], float(p["alpha"]) if "alpha" in p else None)
    kohya = all(m.startswith(tuple(KOHYA_PREFIX.values())) for m in layers)
    if not kohya:
        stray = [m for m in layers if peft_module(m) is None]
        if stray:
            raise LoRAError(f"{name}: module {stray[0]!r} belongs to no known component; expected names starting "
                            "lora_unet_ / lora_te_ (kohya) or unet. / text_encoder. (diffusers/PEFT)")
        _peft_alphas(layers, metadata or {})
    return LoRAFile(name, "kohya" if kohya else "diffusers", layers, metadata or {})


def _peft_alphas(layers: dict[str, LoRALayer], metadata: dict[str, str]) -> None:
    """diffusers stores PEFT's LoraConfig per component in the `lora_adapter_metadata` JSON
    ("unet.lora_alpha", "unet.alpha_pattern", …); without it α = r. Fills in the alphas."""
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    for module, layer in layers.items():
        if layer.alpha is not None:
            continue
        comp = module.split(".")[0]
        alpha = config.get(f"{comp}.lora_alpha")
        for pattern, value in (config.get(f"{comp}.alpha_pattern") or {}).items():
            if re.search(rf"(^|\.){re.escape(pattern)}$", module):    # PEFT matches a pattern as a name suffix
                alpha = value
        if config.get(f"{comp}.use_rslora"):
            raise LoRAError("an rsLoRA file (use_rslora: scale α/√r); sdlearn supports plain LoRA scaling α/r")
        layer.alpha = None if alpha is None else float(alpha)


def read(path: str | os.PathLike) -> LoRAFile:
    """Read and parse a LoRA file (`parse`)."""
    tensors, metadata = read_state_dict(path)
    return parse(tensors, Path(path).name, metadata)


# ----------------------------------------------------------------------------------- matching the model

def describe(pipe) -> str:
    """'SD v1.x (768-wide text features)' or 'a model with 64-wide text features' (the tiny one)."""
    width = pipe.unet.config.cross_attention_dim
    return "SD v1.x (768-wide text features)" if width == 768 else f"a model with {width}-wide text features"


FAMILIES = {768: "SD v1.x", 1024: "SD 2.x", 1280: "SDXL", 2048: "SDXL"}


def check_family(lora: LoRAFile, pipe) -> None:
    """A clear error for a LoRA made for another model family, from the width of the text features
    it reads: the cross-attention's to_k/to_v input (768 SD v1.x, 1024 SD 2.x, 2048 SDXL) and the
    text encoder's width; and from text-encoder layers the model does not have (SD 2.x: 23)."""
    width = pipe.unet.config.cross_attention_dim
    te_layers = pipe.text_encoder.config.num_hidden_layers
    for module, layer in lora.layers.items():
        found = None
        if re.search(r"attn2[._]to_[kv]$", module) or re.search(r"self_attn[._][qkv]_proj$", module):
            found = layer.down.shape[1]
        if found is not None and found != width:
            family = FAMILIES.get(found, f"a model with {found}-wide text features")
            raise LoRAError(f"{lora.name} is a LoRA for {family} ({module} reads {found}-wide text features); "
                            f"this pipeline is {describe(pipe)}: load a LoRA made for it")
        index = re.search(r"encoder[._]layers[._](\d+)[._]", module)
        if index and int(index.group(1)) >= te_layers:
            family = "SD 2.x (OpenCLIP, 23 layers used)" if int(index.group(1)) >= 12 else "a larger model"
            raise LoRAError(f"{lora.name} is a LoRA for {family}: it changes text-encoder layer {index.group(1)}, "
                            f"and this pipeline's text encoder has {te_layers} layers")


def fits(weight: tuple[int, ...], update: tuple[int, ...]) -> bool:
    """Does an update of shape (out, in[, k, k]) fit a weight? Equal shapes, or a linear one and a
    1×1 conv one of the same sizes (files store proj_in / proj_out either way)."""
    strip = lambda shape: shape[:2] if shape[2:] == (1, 1) else shape
    return weight == update or strip(weight) == strip(update)


def resolve(lora: LoRAFile, pipe) -> dict[tuple[str, str], LoRALayer]:
    """The file's layers under the pipeline's names: {(component, module name): LoRALayer}, every
    shape checked against the weight it will change."""
    check_family(lora, pipe)
    names = kohya_names(pipe) if lora.format == "kohya" else None
    out = {}
    for file_module, layer in lora.layers.items():
        target = names.get(file_module) if names is not None else peft_module(file_module)
        modules = lora_modules(getattr(pipe, target[0])) if target else {}
        if target is None or target[1] not in modules:
            raise LoRAError(f"{lora.name}: this model has no layer {file_module!r} "
                            f"(is the file for another model? this pipeline is {describe(pipe)})")
        weight = modules[target[1]].weight
        check_rank(layer.down, layer.up, f"{lora.name}: {file_module}")
        got = (layer.up.shape[0], *layer.down.shape[1:])
        if not fits(tuple(weight.shape), got):
            raise LoRAError(f"{lora.name}: {file_module} makes a {list(got)} update but {target[1]} is "
                            f"{list(weight.shape)}: the file is for another model (this pipeline is {describe(pipe)})")
        out[target] = layer
    return out


# ----------------------------------------------------------------------------------- fusing

def fuse(model: nn.Module, module: str, delta: torch.Tensor) -> None:
    """W ← W + ΔW on one layer, as a new tensor; the first time, the original W is kept (a
    reference; moved to the CPU if it lives elsewhere) for `restore`."""
    layer = model.get_submodule(module)
    originals = model.__dict__.setdefault("_lora_originals", {})
    weight = layer.weight.detach()
    if module not in originals:
        originals[module] = weight if weight.device.type == "cpu" else weight.to("cpu")
    layer.weight.data = (weight.float() + delta.to(weight.device).view(weight.shape)).to(weight.dtype)


def restore(model: nn.Module) -> int:
    """Put every original weight back (the same tensors: bit-exact); returns how many."""
    originals = model.__dict__.pop("_lora_originals", {})
    for module, weight in originals.items():
        layer = model.get_submodule(module)
        layer.weight.data = weight.to(layer.weight.device)
    return len(originals)


@dataclass
class Loaded:
    """What `load` did: the file, its format, the scale, and how many layers of each component."""
    name: str
    format: str
    scale: float
    layers: dict[str, int]
    ranks: tuple[int, ...]
    path: Path | None = None        # resolved: the same file loaded twice is noticed (`load` warns)


def apply(pipe, layers: dict[tuple[str, str], LoRALayer], scale: float = 1.0) -> None:
    """Fuse already resolved layers into the pipeline's weights (`resolve`, `lora_delta`, `fuse`)."""
    with torch.no_grad():
        for (comp, module), layer in layers.items():
            model = getattr(pipe, comp)
            device = model.get_submodule(module).weight.device     # ΔW computed where the weight lives
            fuse(model, module, lora_delta(layer.down.to(device), layer.up.to(device), layer.alpha, scale))


def load(pipe, path: str | os.PathLike, scale: float = 1.0) -> Loaded:
    """Read a kohya or diffusers/PEFT LoRA file and fuse it into the pipeline's UNet and text
    encoder at `scale`. Every check runs before any weight changes. Returns what was loaded.

    Loading adds: the same file loaded again is fused twice (2·ΔW at equal scales), which `load`
    allows — two LoRAs add by design — but warns about."""
    scale = check_scale(scale)
    lora = read(path)
    layers = resolve(lora, pipe)
    apply(pipe, layers, scale)
    counts = {c: sum(1 for comp, _ in layers if comp == c) for c in COMPONENTS}
    resolved = Path(path).expanduser().resolve()
    earlier = [l.scale for l in loaded(pipe) if l.path == resolved]
    if earlier:
        warnings.warn(f"{lora.name} was already loaded (scale {', '.join(f'{s:g}' for s in earlier)}); it is now "
                      f"applied {len(earlier) + 1} times (total scale {sum(earlier) + scale:g}); "
                      "pipe.unload_lora() removes every LoRA, then load it once", UserWarning, stacklevel=3)
    done = Loaded(lora.name, lora.format, scale, counts, tuple(sorted({l.rank for l in layers.values()})), resolved)
    pipe.__dict__.setdefault("_loras", []).append(done)
    return done


def unload(pipe) -> int:
    """Remove every loaded LoRA: the original weights back, bit for bit. Returns the layer count."""
    pipe.__dict__.pop("_loras", None)
    return sum(restore(getattr(pipe, comp)) for comp in COMPONENTS)


def loaded(pipe) -> list[Loaded]:
    """The LoRAs fused into the pipeline now, in loading order."""
    return list(pipe.__dict__.get("_loras", []))


def summary(pipe) -> str:
    """The loaded LoRAs for Pipeline's repr: "LoRA outline.safetensors×1, style.safetensors×0.5" ('' if none)."""
    names = [f"{l.name}×{l.scale:g}" for l in loaded(pipe)]
    return "LoRA " + ", ".join(names) if names else ""


# ----------------------------------------------------------------------------------- saving

def save_kohya(path: str | os.PathLike, layers: dict[tuple[str, str], LoRALayer],
               metadata: dict[str, str] | None = None) -> Path:
    """Write {(component, module): LoRALayer} as a kohya / web-UI file (lora_unet_…, lora_te_…,
    .lora_down.weight, .lora_up.weight, .alpha), float32. Refuses to overwrite."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it first or choose another name")
    tensors = {}
    for (comp, module), layer in layers.items():
        key = kohya_name(comp, module)
        tensors[f"{key}.lora_down.weight"] = layer.down.detach().float().contiguous().cpu()
        tensors[f"{key}.lora_up.weight"] = layer.up.detach().float().contiguous().cpu()
        tensors[f"{key}.alpha"] = torch.tensor(float(layer.rank if layer.alpha is None else layer.alpha))
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return path
