"""One small storage layer for every cache: safetensors files, written atomically, validated on read.

Why safetensors: it loads far faster than `.npz` and carries a string->string metadata header, where the caches
record their provenance (source file, bucket, encoder) so staleness is decided from the file's content, not its
name. Why atomic: a training run killed mid-write must never leave a half file that the next run trusts.
"""
from __future__ import annotations

import json
import os
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.fileio import atomic_path


class CacheCorrupt(UserError):
    """A cache file exists but cannot be read (truncated, not safetensors, wrong header). Callers rebuild it."""


def save_tensors_atomic(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same directory, fsync it, then rename over `path` (atomic on POSIX and
    Windows), so readers see either the old file or the complete new one."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path, suffix=".safetensors", fsync=True) as tmp:
        save_file(tensors, tmp, metadata={str(k): str(v) for k, v in metadata.items()})


# A safetensors header is a few kilobytes even for thousands of tensors; anything far larger is not ours.
MAX_HEADER_BYTES = 100_000_000
# Errors a hostile or damaged file can make the JSON or safetensors parsers raise. RecursionError: a deeply nested
# header; the rest: wrong types, truncation, garbage.
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError,
                struct.error, SafetensorError)


def _corrupt(path: str, reason: object) -> CacheCorrupt:
    return CacheCorrupt(f"{path}: unreadable cache file ({_one_line(reason)}); it will be rebuilt or can be deleted")


def _one_line(reason: object) -> str:
    text = " ".join(str(reason).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _parse_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file, checked for the shape the format prescribes (entries with a dtype,
    a shape and in-bounds data offsets; a string-to-string `__metadata__`), and the header length."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError("file shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise ValueError(f"header length {header_len} exceeds the file size {size}")
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(f"header length {header_len} is implausibly large")
        raw = f.read(header_len)
    if raw[:1] != b"{":
        raise ValueError("header is not a JSON object")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError("__metadata__ is not a string-to-string object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            raise ValueError(f"tensor entry {name!r} has no dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"tensor entry {name!r} has a bad shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor entry {name!r} has bad data offsets")
        data_end = max(data_end, offsets[1])
    if 8 + header_len + data_end != size:
        raise ValueError(f"file is {size} bytes, header describes {8 + header_len + data_end}")
    return header, header_len


def read_metadata(path: str) -> dict[str, str]:
    """Header metadata only, without reading tensor data. Also checks the header's structure and that the file is
    as long as its header says, which catches the common corruption (a truncated write) cheaply. Anything wrong,
    however hostile the header (a huge declared length, a 100k-deep nested JSON), is a `CacheCorrupt`."""
    try:
        header, _ = _parse_header(path)
    except _READ_ERRORS as e:
        raise _corrupt(path, e) from None
    return dict(header.get("__metadata__") or {})


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a cache file; `CacheCorrupt` when it cannot be read."""
    metadata = read_metadata(path)
    try:
        tensors = load_file(path, device="cpu")
    except (*_READ_ERRORS, RuntimeError) as e:  # safetensors' own parser: SafetensorError, or torch's RuntimeError
        raise _corrupt(path, e) from None
    return tensors, metadata
