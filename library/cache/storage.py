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


def read_metadata(path: str) -> dict[str, str]:
    """Header metadata only, without reading tensor data. Also checks that the file is as long as its header
    says, which catches the common corruption (a truncated write) cheaply."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8 or header_len > 100_000_000:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + data_end != size:
            raise ValueError(f"file is {size} bytes, header describes {8 + header_len + data_end}")
        metadata = header.get("__metadata__") or {}
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise CacheCorrupt(f"{path}: unreadable cache file ({e}); it will be rebuilt or can be deleted") from None
    return dict(metadata)


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a cache file; `CacheCorrupt` when it cannot be read."""
    metadata = read_metadata(path)
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CacheCorrupt(f"{path}: unreadable cache file ({e}); it will be rebuilt or can be deleted") from None
    return tensors, metadata
