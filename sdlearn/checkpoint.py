"""Opening a checkpoint and building the three networks from it, with every check on the way.

    ckpt = open_checkpoint("v1-5-pruned-emaonly.safetensors")   # headers only: names, shapes, dtypes
    unet = load_component(ckpt, "unet", device, dtype)          # the module, weights assigned

Opening reads no tensor data: every tensor is a getter under its sdlearn name (the original
layout renamed by `sdlearn.layouts`). Loading builds the module on the meta device (shapes, no
memory), then assigns each tensor, cast and moved as it is read. On the CPU in its stored dtype a
weight stays a view of the memory-mapped file, so the weights are never held twice. Missing
tensors and wrong shapes are errors; unexpected tensors and NaN/inf values are warnings.
`.ckpt`/`.pt` pickles are read with `torch.load(weights_only=True)` only: no code in them runs.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .clip import CLIPTextModel
from .configs import CLIPTextConfig, ConfigError, ModelConfig, UNetConfig, VAEConfig
from .layouts import (PREFIX, block_rules, check_config, detect_layout, from_original_key, infer_original_config,
                      is_vae_attention_matrix)
from .safetensors_file import DTYPES, CheckpointError, SafetensorsFile
from .unet import UNet
from .vae import AutoencoderKL

COMPONENTS = ("text_encoder", "unet", "vae")
MODEL_CLASSES = {"text_encoder": CLIPTextModel, "unet": UNet, "vae": AutoencoderKL}

# -- opening: names, shapes and dtypes, no data -------------------------------------------------

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
    scheduler_config: dict | None = None   # a diffusers scheduler/scheduler_config.json


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


def open_tensor_file(path: Path):
    """A .safetensors file (memory-mapped, headers read) or a .ckpt/.pt/.pth/.bin pickle (loaded with
    weights_only=True): an object with keys() and [key] → tensor. Used by sdlearn.lora too."""
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
    f = open_tensor_file(path)
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
            ours = from_original_key(rest, block_rules(comp, config))
            if ours is None:
                ckpt.unexpected.setdefault(comp, []).append(orig)
                continue
            _add(ckpt, comp, ours, _Stored(f, orig), *shapes_all[orig])
    ckpt.other = {k: shapes_all[k][0] for k in keys if k not in used}
    return ckpt


def _add(ckpt: Checkpoint, comp: str, key: str, getter: Getter, shape, dtype) -> None:
    ckpt.tensors.setdefault(comp, {})[key] = getter
    ckpt.shapes.setdefault(comp, {})[key] = tuple(shape)
    ckpt.dtypes.setdefault(comp, {})[key] = dtype


DIFFUSERS_FILES = {
    "unet": ["diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"],
    "vae": ["diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"],
    "text_encoder": ["model{v}.safetensors", "pytorch_model{v}.bin"],
}


def _diffusers_weight_file(folder: Path, comp: str) -> Path:
    """The component's weights: the full-precision file, else its .fp16 variant."""
    for v in ("", ".fp16"):
        for pattern in DIFFUSERS_FILES[comp]:
            p = folder / comp / pattern.format(v=v)
            if p.exists():
                return p
    raise CheckpointError(f"{folder.name}: component {comp}/ has no weights (looked for "
                          f"{', '.join(p.format(v='') for p in DIFFUSERS_FILES[comp])} and .fp16 variants)")


def _read_json(path: Path, folder_name: str) -> dict | None:
    """A JSON object from a file of a diffusers folder; None if the file is absent."""
    where = f"{folder_name}/{path.parent.name}/{path.name}"
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} holds a JSON {type(value).__name__}; expected an object")
    return value


def _open_diffusers_folder(folder: Path) -> Checkpoint:
    if not (folder / "model_index.json").exists():
        raise CheckpointError(f"{folder}: a folder without model_index.json; expected a diffusers "
                              "folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/)")
    missing = [c for c in COMPONENTS if not (folder / c / "config.json").exists()]
    if missing:
        raise CheckpointError(f"{folder.name}: diffusers folder lacks {', '.join(c + '/config.json' for c in missing)}; "
                              "download the missing component(s) again")
    configs = {comp: _read_json(folder / comp / "config.json", folder.name) for comp in COMPONENTS}
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
        f = open_tensor_file(_diffusers_weight_file(folder, comp))
        for k in f.keys():
            if comp == "text_encoder" and k.endswith("position_ids"):
                continue
            ours = k
            if comp == "text_encoder" and not k.startswith("text_model."):
                ours = "text_model." + k      # transformers 5 saves CLIPTextModel without the prefix
            _add(ckpt, comp, ours, _Stored(f, k), *_shape_dtype(f, k))
    ckpt.scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json", folder.name)
    tok = folder / "tokenizer"
    if ((tok / "vocab.json").exists() and (tok / "merges.txt").exists()) or (tok / "tokenizer.json").exists():
        ckpt.tokenizer_folder = tok
    return ckpt


# -- loading: meta-device build, assign, checks ---------------------------------------------------

def build_empty(component: str, config: ModelConfig) -> torch.nn.Module:
    """The module with parameters on the meta device: shapes only, no memory."""
    if component not in MODEL_CLASSES:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    with torch.device("meta"):
        return MODEL_CLASSES[component](getattr(config, component))


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


# -- a summary (what `sdlearn info` prints) ----------------------------------------------------------

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
