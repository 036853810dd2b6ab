"""The diffusers AutoencoderKL config of a VAE state dict with diffusers names, shared by the SDXL and FLUX loaders.

Both families use the same encoder/decoder architecture, so the shape-derived part of the config (channels,
levels, resnets per level) is read the same way; what differs (where the latent width is read, the GroupNorm
group count, the scaling constants) comes in as arguments. Nothing here knows a model family.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def count_indices(keys: Iterable[str], pattern: str) -> int:
    """1 + the largest index captured by `pattern` (a regex with one integer group, matched at the key start)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def groups_dividing(channels: Iterable[int], preferred: int = 32) -> int:
    """GroupNorm groups when the file does not say: `preferred` (SDXL's 32), or the largest power of two below it
    dividing every width (tiny test models have widths like 8 or 16)."""
    widths = list(channels)
    groups = preferred
    while groups > 1 and any(c % groups for c in widths):
        groups //= 2
    return groups


def infer_autoencoder_kl_config(
    sd: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    latent_channels_key: str,
    latent_channels_dim: int,
    defaults: Mapping[str, Any],
    norm_num_groups: int | None = None,
) -> dict[str, Any]:
    """AutoencoderKL config: shapes from `sd`, then `defaults`, then the file's own `meta` (which wins).

    `latent_channels_key`/`latent_channels_dim` name the tensor and axis holding the latent width (FLUX has no
    post-quant conv, SDXL reads it there). `norm_num_groups=None` means `groups_dividing(block_out_channels)`.
    A missing tensor raises KeyError, which the loaders turn into a message naming the file.
    """
    keys = list(sd.keys())
    levels = count_indices(keys, r"encoder\.down_blocks\.(\d+)\.")
    block_out = [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    config: dict[str, Any] = {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": block_out,
        "layers_per_block": count_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "latent_channels": sd[latent_channels_key].shape[latent_channels_dim],
        **defaults,
    }
    config["norm_num_groups"] = groups_dividing(block_out) if norm_num_groups is None else norm_num_groups
    config.update(meta)
    return config


__all__ = ["count_indices", "groups_dividing", "infer_autoencoder_kl_config"]
