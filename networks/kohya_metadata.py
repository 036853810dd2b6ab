"""The metadata kohya-format LoRA files carry: sd-scripts' `ss_*` training keys and the `sshs_*` hashes.

UIs (A1111's additional-networks, civitai) read these keys, so their names and string formats follow sd-scripts.
They depend only on tensors and plain values, not on any network class, so both the SDXL and FLUX LoRA modules
use them.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import mimetypes
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import safetensors.torch
import torch

logger = logging.getLogger(__name__)

SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
DEFAULT_NETWORK_MODULE = "networks.lora"  # the `--network_module` value sd-scripts records for an SDXL LoRA


def precalculate_safetensors_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as sd-scripts computes them for the additional-networks web UI.

    The file is serialised in memory with only the `ss_` metadata (user metadata may change later without changing
    the hashes). The model hash is the sha256 of everything after the header, i.e. of the tensor bytes; the legacy
    hash is the first 8 hex digits of the sha256 of 64 KiB read at 1 MiB into the file.
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = safetensors.torch.save(dict(tensors), ss_only or None)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def metadata_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """safetensors metadata must be str -> str: dicts and lists become JSON (readable back), the rest `str()`."""
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            out[str(key)] = value
        elif isinstance(value, (dict, list)):
            out[str(key)] = json.dumps(value)
        else:
            out[str(key)] = str(value)
    return out


def build_ss_metadata(
    *,
    network_dim: int,
    network_alpha: float,
    network_args: Mapping[str, Any] | None = None,
    network_module: str = DEFAULT_NETWORK_MODULE,
    network_dropout: float | None = None,
    learning_rate: float | None = None,
    unet_lr: float | None = None,
    text_encoder_lr: float | Sequence[float] | None = None,
    training_started_at: float | None = None,
    output_name: str | None = None,
    num_train_images: int | None = None,
    num_reg_images: int | None = None,
    num_batches_per_epoch: int | None = None,
    num_epochs: int | None = None,
    max_train_steps: int | None = None,
    seed: int | None = None,
    resolution: tuple[int, int] | None = None,
    mixed_precision: str | None = None,
    optimizer: str | None = None,
    lr_scheduler: str | None = None,
    gradient_checkpointing: bool | None = None,
    gradient_accumulation_steps: int | None = None,
    base_model_version: str = SDXL_BASE_MODEL_VERSION,
    v2: bool = False,
    session_id: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The `ss_*` training metadata that sd-scripts writes and that UIs (A1111, civitai) display.

    All values are strings, as safetensors requires; unset ones are written as "None" like sd-scripts does, so that
    readers find every usual key. `extra` adds or overrides keys verbatim (e.g. `ss_clip_skip`, `modelspec.*`).
    """
    meta: dict[str, Any] = {
        "ss_session_id": session_id if session_id is not None else int.from_bytes(os.urandom(4), "little") >> 1,
        "ss_training_started_at": training_started_at if training_started_at is not None else time.time(),
        "ss_output_name": output_name,
        "ss_learning_rate": learning_rate,
        "ss_text_encoder_lr": list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else text_encoder_lr,
        "ss_unet_lr": unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": gradient_checkpointing,
        "ss_gradient_accumulation_steps": gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_scheduler": lr_scheduler,
        "ss_network_module": network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_dropout": network_dropout,
        "ss_mixed_precision": mixed_precision,
        "ss_v2": bool(v2),
        "ss_base_model_version": base_model_version,
        "ss_seed": seed,
        "ss_optimizer": optimizer,
        "ss_resolution": tuple(resolution) if resolution is not None else None,
    }
    if network_args:
        meta["ss_network_args"] = json.dumps({k: str(v) for k, v in network_args.items()})
    out = {k: str(v) for k, v in meta.items()}
    out.update(metadata_strings(extra))
    return out


def ss_metadata_for_save(metadata: Mapping[str, str], *, steps: int, epoch: int) -> dict[str, str]:
    """A copy with the per-save keys sd-scripts updates at each checkpoint (finish time, step, epoch)."""
    out = dict(metadata)
    out.update({"ss_training_finished_at": str(time.time()), "ss_steps": str(steps), "ss_epoch": str(epoch)})
    return out


# ---- modelspec (Stability AI's model-spec 1.0.1 keys, as sd-scripts writes them into LoRA files) ------------------
MODELSPEC_VERSION = "1.0.1"
# architecture ids per family; a LoRA gets the "/lora" adapter suffix
MODELSPEC_ARCHITECTURES = {"sdxl": "stable-diffusion-xl-v1-base", "flux": "flux-1", "flux-dev": "flux-1-dev",
                           "flux-schnell": "flux-1-schnell"}
MODELSPEC_IMPLEMENTATIONS = {"sdxl": "https://github.com/Stability-AI/generative-models",
                             "flux": "https://github.com/black-forest-labs/flux"}
# --metadata_<name> flags written as modelspec.<name>
MODELSPEC_USER_FIELDS = ("title", "author", "description", "license", "tags", "trigger_phrase", "usage_hint",
                         "merged_from", "preprocessor", "is_negative_embedding", "thumbnail")


def thumbnail_data_url(value: str) -> str | None:
    """modelspec.thumbnail holds the image itself: a file path becomes a data: URL; a missing file is skipped with a
    warning (the model still saves)."""
    if value.startswith("data:"):
        return value
    try:
        with open(value, "rb") as fh:
            data = fh.read()
    except OSError as e:
        logger.warning("--metadata_thumbnail %s: cannot read it (%s); the file is saved without a thumbnail",
                       value, e.strerror)
        return None
    mime = mimetypes.guess_type(value)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def build_modelspec(
    *,
    family: str,
    title: str,
    resolution: tuple[int, int],
    user_fields: Mapping[str, str | None] | None = None,
    v_parameterization: bool = False,
    timesteps: tuple[int, int] | None = None,
    clip_skip: int | None = None,
    implementation_version: str | None = None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """The `modelspec.*` keys of a LoRA-style adapter file, with the values sd-scripts writes: architecture with the
    `/lora` suffix, implementation URL, ISO date, `WxH` resolution, prediction type (not for FLUX), timestep range
    and encoder layer when set, and the user's --metadata_* fields (title defaults to the output name)."""
    ts = time.time() if timestamp is None else timestamp
    arch = MODELSPEC_ARCHITECTURES.get(family, family)
    impl = MODELSPEC_IMPLEMENTATIONS.get(family.split("-")[0], "diffusers")
    out: dict[str, str] = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
    }
    if not family.startswith("flux"):
        out["modelspec.prediction_type"] = "v" if v_parameterization else "epsilon"
    if timesteps is not None:
        out["modelspec.timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    if clip_skip is not None:
        out["modelspec.encoder_layer"] = str(clip_skip)
    if implementation_version:
        out["modelspec.implementation_version"] = implementation_version
    for name, value in (user_fields or {}).items():
        if value is None:
            continue
        if name == "thumbnail":
            value = thumbnail_data_url(value)
            if value is None:
                continue
        out[f"modelspec.{name}"] = str(value)
    return out


__all__ = [
    "DEFAULT_NETWORK_MODULE", "MODELSPEC_USER_FIELDS", "SDXL_BASE_MODEL_VERSION", "build_modelspec",
    "build_ss_metadata", "metadata_strings",
    "precalculate_safetensors_hashes", "ss_metadata_for_save",
]
