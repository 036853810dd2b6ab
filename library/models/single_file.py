"""Reading one checkpoint file (every family's loader starts here): its tensors and string metadata, and the model
configs we store as JSON in a safetensors header (values tensor shapes cannot give, e.g. head counts)."""
from __future__ import annotations

import json
from typing import Any, Mapping

import torch
from safetensors import safe_open

from library.errors import ModelLoadError

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")

_MMAP = {"enabled": True}  # --disable_mmap_load_safetensors turns it off for the whole run (set_safetensors_mmap)


def set_safetensors_mmap(enabled: bool) -> None:
    """Memory-map .safetensors files (the default) or read each into memory in one go (sd-scripts'
    --disable_mmap_load_safetensors: much faster where mapped pages come slowly, e.g. WSL or network drives)."""
    _MMAP["enabled"] = enabled


def _read_safetensors_in_memory(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load

    with open(path, "rb") as f:
        data = f.read()
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    return load(data), metadata


def read_single_file(path: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a .safetensors file (or of a pickle checkpoint when allowed)."""
    lower = path.lower()
    if lower.endswith(PICKLE_EXTENSIONS):
        if not allow_pickle:
            raise ModelLoadError(
                f"{path}: pickle checkpoints (.ckpt/.pt/.bin) can run arbitrary code when loaded; convert the file "
                "to .safetensors or pass --allow_pickle if you trust it"
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise ModelLoadError(f"{path}: cannot read the checkpoint: {exc}") from exc
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ModelLoadError(f"{path}: the checkpoint holds no state dict")
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}
    try:
        if not _MMAP["enabled"]:
            return _read_safetensors_in_memory(path)
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise ModelLoadError(f"{path}: cannot read the safetensors file: {exc}") from exc


def json_config_from_metadata(path: str, metadata: Mapping[str, str] | None, key: str) -> dict[str, Any]:
    """The JSON object under `key`, or {} when the file (e.g. an official checkpoint) has none."""
    raw = (metadata or {}).get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: metadata '{key}' is not valid JSON: {exc}") from None
    return value if isinstance(value, dict) else {}
