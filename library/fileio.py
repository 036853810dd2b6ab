"""Atomic file writes, in one place.

Every output a run or a rerun trusts (LoRA weights, caches, reports, captions, configs) is written to a temporary
file in the target's own folder and renamed over the target only once complete: a crash mid-write leaves either
the old file or none, never a half file. The temp file lives in the same folder because a rename is only atomic
within one file system.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping

import torch


def _default_file_mode() -> int:
    """The mode `open()` would give a new file: mkstemp's private 0600 would otherwise leak onto the final file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp", fsync: bool = False) -> Iterator[str]:
    """Yield a temp path next to `path`; on a clean exit rename it onto `path`, on any exception delete it.

    The body writes the temp path by name (safetensors, PIL, cv2 and torch all want a path). `suffix` lets
    writers that infer the format from the extension see the right one; `fsync` flushes the data to disk before
    the rename, for files whose loss after a power cut would go unnoticed (caches).
    """
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, _default_file_mode())
        yield tmp
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, newline: str | None = "\n") -> None:
    """Write UTF-8 text atomically; `newline="\\n"` keeps files byte-identical across platforms."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline=newline) as handle:
            handle.write(text)


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = False,
) -> None:
    """Write a safetensors file atomically; tensors are made contiguous (safetensors refuses strided views)."""
    from safetensors.torch import save_file

    data = {k: v.contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata is not None else None
    with atomic_path(path, suffix=".safetensors", fsync=fsync) as tmp:
        save_file(data, tmp, metadata=meta)


__all__ = ["atomic_path", "write_text_atomic", "save_safetensors_atomic"]
