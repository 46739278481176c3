"""The safetensors format, read by hand: how a checkpoint file is laid out.

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [raw tensor bytes …]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the first byte after the header), plus an optional "__metadata__" dict of strings.
Because the bytes are raw and contiguous, a tensor can be a *view* of a memory-mapped file:
nothing is read until it is used, and nothing is copied when dtype and device already match.
Every field is checked (lengths, offsets inside the file, no overlaps), so a truncated or
hostile file gets a one-line error instead of a crash. No code is ever run from a file.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

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
