"""Atomic file writes, in one place.

Every output a run or a rerun trusts (LoRA weights, caches, reports, captions, configs) is written to a temporary
file in the target's own folder and renamed over the target only once complete: a crash mid-write leaves either
the old file or none, never a half file. The temp file lives in the same folder because a rename is only atomic
within one file system.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping

import torch

# Temp names are `.<target name>.tmp-<pid>-<random><suffix>`: the marker and the pid make our own leftovers
# recognisable (and the pid tells whose they were), so a cleanup never touches a user's dot-file.
TEMP_MARKER = ".tmp-"
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[A-Za-z0-9_]{8}(?P<suffix>\.[^.]*)?$")
# Names written by earlier versions (no marker): `.<target name>.<random><suffix>`; only removed when the target
# they were written for sits beside them, which a user's dot-file practically never matches.
_LEGACY_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]*)?$")
STALE_TEMP_AGE_S = 3600.0


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

    The mode is set after the body ran, not before: some writers (safetensors >= 0.8 among them) write their own
    temp file and rename it over the given path, which replaces our file and its mode with a private 0600 one.
    """
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(target)}{TEMP_MARKER}{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_file_mode())
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


def is_temp_file_name(name: str, folder: str | None = None) -> bool:
    """Whether `name` is a temp file of `atomic_path`. Legacy (marker-less) names count only when `folder` is
    given and holds the target they were written for."""
    if _TEMP_NAME.match(name):
        return True
    legacy = _LEGACY_TEMP_NAME.match(name)
    return bool(legacy and folder and os.path.isfile(os.path.join(folder, legacy.group("target"))))


def remove_stale_temp_files(folder: str | os.PathLike, older_than: float = STALE_TEMP_AGE_S) -> list[str]:
    """Delete the temp files a killed writer left in `folder` (not recursive); returns the removed paths.

    Only names `atomic_path` makes are touched, and only when unmodified for `older_than` seconds: a live writer
    keeps its temp file's mtime fresh while writing and renames it seconds after, so an old one is an orphan,
    even when another process on another machine shares the folder (where a pid check would mean nothing).
    """
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except OSError:  # a folder that does not exist (yet) or cannot be listed holds nothing of ours to clean
        return []
    now = time.time()
    removed = []
    for name in names:
        if not name.startswith(".") or not is_temp_file_name(name, folder):
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if not os.path.isfile(path) or os.path.islink(path) or now - st.st_mtime < older_than:
                continue
            os.remove(path)
        except FileNotFoundError:  # another process cleaned it first
            continue
        except OSError:  # not ours to delete after all (permissions): leave it
            continue
        removed.append(path)
    return removed


__all__ = ["atomic_path", "write_text_atomic", "save_safetensors_atomic", "remove_stale_temp_files",
           "is_temp_file_name"]
