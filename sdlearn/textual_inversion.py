"""Textual inversion: a new word for the text encoder, learned as one row of its embedding table.

CLIP reads a prompt as rows of its token-embedding table E (49,408 × 768 for SD v1.x): x_i = E[id_i].
Textual inversion (Gal et al. 2022, "An Image is Worth One Word") adds a token, "<star>", and a
row v for it, learned with every weight of the model frozen; then "a red <star>" places v among
the ordinary words' rows, and the text encoder, the UNet and the VAE run unchanged:

    tokenizer:  "<star>" → id 49408 (the first free id), matched whole before the BPE
    table:      E' = [E; v]                 (49,409 × D): one copy of E, once
    multi-vector files (n rows): tokens <star>, <star>_1, …, <star>_{n−1}, and every prompt's
                "<star>" is written "<star> <star>_1 … <star>_{n−1}" before tokenizing
                (diffusers' `maybe_convert_prompt`)

The files people share for SD v1.x (`read_embeddings`):
    diffusers    learned_embeds.safetensors / .bin: {token: (D,) or (n, D)}   (token = the key)
    web UI       name.pt: {"string_to_param": {"*": (n, D)}, "name": …, "step": …}   (token = "name",
                 as diffusers reads it; the web UI uses the file's name, usually the same)
                 name.safetensors: {"emb_params": (n, D)}   (token = the file's name)
`.pt`/`.bin` are pickles: read with `torch.load(weights_only=True)` only, so no code runs.
Width D must be the text encoder's (768 for SD v1.x); SD 2.x files hold 1024, SDXL files two
tables "clip_l" (768) and "clip_g" (1280): both are refused with a one-line error.

    tokens = pipe.load_textual_inversion("learned_embeds.safetensors")        # ["<cat-toy>"]
    pipe.generate("a <cat-toy> on a beach")
    pipe.unload_textual_inversion()                                            # back to E exactly

The result equals diffusers' `StableDiffusionPipeline.load_textual_inversion` on the same files
(tests/test_textual_inversion.py); training on the tiny model is `sdlearn.ti_train`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .safetensors_file import SafetensorsFile
from .tokenizer import clean

DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")   # diffusers' file names in a folder
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")


class EmbeddingFileError(ValueError):
    """A textual-inversion file sdlearn cannot use; the message says why and what to do."""


# ----------------------------------------------------------------------------------- reading files

def read_embeddings(path: str | os.PathLike) -> tuple[str, torch.Tensor]:
    """An embedding file (or a folder with learned_embeds.*) → (the token it names, rows (n, D)).

    The token: the key of a diffusers file, the "name" of a web-UI .pt file, the file's name
    (without suffix) for a web-UI .safetensors file (`emb_params`) or a bare tensor.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in DIFFUSERS_NAMES if (path / n).is_file()]
        if not found:
            raise EmbeddingFileError(f"{path} is a folder without {' or '.join(DIFFUSERS_NAMES)}; pass the embedding file")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such textual-inversion file")
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        state = {k: f[k] for k in f.keys()}
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EmbeddingFileError(f"{path.name}: not a plain tensor file that torch.load(weights_only=True) "
                                     f"accepts ({type(e).__name__}); sdlearn runs no code from a file. Convert "
                                     "it to .safetensors where you trust it") from None
    else:
        raise EmbeddingFileError(f"{path.name}: expected a .safetensors, .pt or .bin embedding file")
    return _token_and_rows(state, path)


def _token_and_rows(state, path: Path) -> tuple[str, torch.Tensor]:
    """What a loaded file holds → (token, rows (n, D)), in diffusers' order of formats."""
    if isinstance(state, torch.Tensor):
        return path.stem, as_rows(state, path.name)
    if not isinstance(state, dict):
        raise EmbeddingFileError(f"{path.name}: expected a dict of tensors, found a {type(state).__name__}")
    if {"clip_l", "clip_g"} & set(state):
        raise EmbeddingFileError(f"{path.name} is an SDXL embedding (clip_l and clip_g tables); sdlearn loads "
                                 "SD v1.x embeddings (one table of width 768)")
    if "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise EmbeddingFileError(f"{path.name}: string_to_param should hold the rows under '*'; found {params!r:.80}")
        return str(state.get("name") or path.stem), as_rows(params["*"], path.name)
    if "emb_params" in state:
        return path.stem, as_rows(state["emb_params"], path.name)
    if len(state) == 1:
        token, rows = next(iter(state.items()))
        return str(token), as_rows(rows, path.name)
    raise EmbeddingFileError(f"{path.name}: expected one token's rows ({{token: tensor}}), 'string_to_param' "
                             f"or 'emb_params'; found the keys {sorted(map(str, state))[:6]}")


def as_rows(t, name: str = "the embedding") -> torch.Tensor:
    """A (D,) or (n, D) tensor → float32 (n, D), detached."""
    if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2) or not t.is_floating_point() or t.numel() == 0:
        what = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise EmbeddingFileError(f"{name}: expected float rows (D,) or (n, D); found {what}")
    return t.detach().float().reshape(-1, t.shape[-1]).clone()


def token_names(token: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding, as diffusers names them: [token, token_1, …, token_{n−1}]."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


# ----------------------------------------------------------------------------------- the embedding table

def add_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """E' = [E; rows]: (V, D), (n, D) → (V + n, D), in E's dtype and device (one copy of E)."""
    if rows.shape[-1] != table.shape[-1]:
        raise ValueError(f"rows of width {rows.shape[-1]} cannot extend a table of width {table.shape[-1]}")
    return torch.cat([table, rows.to(table)])


def set_table(embedding: nn.Embedding, table: torch.Tensor) -> None:
    """Make `table` the weight of `embedding` (its row count changes with it)."""
    embedding.weight = nn.Parameter(table, requires_grad=embedding.weight.requires_grad)
    embedding.num_embeddings = table.shape[0]


def token_embedding(pipe) -> nn.Embedding:
    return pipe.text_encoder.text_model.embeddings.token_embedding


def load(pipe, path: str | os.PathLike, token: str | None = None) -> list[str]:
    """Add the embedding in `path` to `pipe` (see the module docstring); returns the tokens added.

    `token` overrides the name the file gives. Nothing changes if anything is wrong: a wrong
    width, a token that already exists (added before, or a word of the vocabulary), a bad file.
    """
    name, rows = read_embeddings(path)
    return load_rows(pipe, token or name, rows, Path(path).name)


def load_rows(pipe, token: str, rows: torch.Tensor, source: str = "the embedding") -> list[str]:
    """Add rows (n, D) as `token` (n > 1: token, token_1, …) to the tokenizer and the table."""
    table = token_embedding(pipe).weight
    if rows.shape[1] != table.shape[1]:
        hint = {1024: " (an SD 2.x embedding)", 1280: " (an SDXL clip_g table)"}.get(rows.shape[1], "")
        raise EmbeddingFileError(f"{source}: rows of width {rows.shape[1]}{hint}, but this text encoder's "
                                 f"width is {table.shape[1]}; use an embedding made for this model (SD v1.x: 768)")
    tokens = token_names(token, len(rows))
    tokenizer = pipe.tokenizer.with_added_tokens(tokens)          # raises if a token exists
    if tokenizer.added_tokens[tokens[0]] != table.shape[0]:
        raise RuntimeError(f"the tokenizer's next id ({tokenizer.added_tokens[tokens[0]]}) is not the text "
                           f"encoder's next row ({table.shape[0]}): they were changed apart")
    with torch.no_grad():
        set_table(token_embedding(pipe), add_rows(table.detach(), rows))
    pipe.tokenizer = tokenizer
    return tokens


def unload(pipe, tokens: str | Sequence[str] | None = None) -> None:
    """Remove added tokens (None: all of them) and their rows; the others are numbered again.
    A token that is not loaded is refused (one line naming the loaded ones), and nothing changes."""
    tokens = [tokens] if isinstance(tokens, str) else tokens
    old = pipe.tokenizer
    loaded = list(getattr(old, "added_tokens", None) or {})
    unknown = [t for t in tokens or () if t not in loaded]
    if unknown:
        raise ValueError(f"cannot unload {unknown}: not loaded; the loaded tokens are {loaded or 'none'}")
    if not loaded:
        return
    new = old.without_added_tokens(tokens)
    table = token_embedding(pipe).weight.detach()
    base = len(old.encoder)
    kept = [old.added_tokens[t] for t in new.added_tokens]        # old row of each kept token, in order
    with torch.no_grad():
        set_table(token_embedding(pipe), torch.cat([table[:base], table[kept]]) if kept else table[:base].clone())
    pipe.tokenizer = new


def vector_names(added: dict[str, int], token: str) -> list[str]:
    """The loaded tokens of `token`'s embedding: [token, token_1, …] as far as they are in `added`."""
    names = [token]
    while f"{token}_{len(names)}" in added:
        names.append(f"{token}_{len(names)}")
    return names


def expand_prompt(tokenizer, prompt: str) -> str:
    """diffusers' `maybe_convert_prompt`: every multi-vector token "t" found in the prompt is written
    "t t_1 … t_{n−1}" (a plain text replacement), so that its n rows all reach the text encoder.
    For plain prompts only: a weighted prompt is parsed first and its fragments' ids expanded
    (`expand_ids`), so that a fragment's weight covers all n rows."""
    added = getattr(tokenizer, "added_tokens", None)
    if not added:
        return prompt
    for token in set(tokenizer.tokenize(prompt)) & set(added):
        prompt = prompt.replace(token, " ".join(vector_names(added, token)))
    return prompt


def expand_ids(tokenizer, ids: list[int]) -> list[int]:
    """Token ids with each multi-vector token t followed by the ids of t_1 … t_{n−1}: how compel
    (its textual-inversion manager, on each fragment's ids after parsing) and the web UI (an
    embedding's n vectors, all with the fragment's weight) let a weight cover all n rows.
    [.., id(<night>), ..] → [.., id(<night>), id(<night>_1), …, id(<night>_7), ..]"""
    added = getattr(tokenizer, "added_tokens", None)
    if not added:
        return list(ids)
    following = {added[t]: [added[n] for n in vector_names(added, t)[1:]] for t in added}
    return [j for i in ids for j in (i, *following.get(i, ()))]


def without_added_tokens(tokenizer, text: str) -> str:
    """The text with every added token removed (for checks of the words a model knows)."""
    pattern = getattr(tokenizer, "_added_pattern", None)
    return text if pattern is None else pattern.sub(" ", clean(text))


# ----------------------------------------------------------------------------------- saving

def save(path: str | os.PathLike, token: str, rows: torch.Tensor) -> Path:
    """Write rows (D,) or (n, D) in diffusers' format, {token: (n, D)} float32 as its training
    script saves it: `learned_embeds.safetensors` that `load` and diffusers both read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: as_rows(rows).contiguous()}, str(path))
    return path


def summary(tokenizer) -> str:
    """The added tokens for Pipeline's repr: "tokens <ptri> <night>×8" (×n: n vectors; '' if none)."""
    added = getattr(tokenizer, "added_tokens", None) or {}
    later = {t for t in added if re.fullmatch(r".+_\d+", t) and t.rsplit("_", 1)[0] in added}   # <night>_1 …
    shown = [t + (f"×{n}" if (n := 1 + sum(u.rsplit("_", 1)[0] == t for u in later)) > 1 else "")
             for t in added if t not in later]
    return "tokens " + " ".join(shown) if shown else ""
