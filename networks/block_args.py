"""sd-scripts' block-wise `--network_args` for SDXL LoRA: per-block ranks, alphas and learning-rate weights.

sd-scripts splits the SDXL U-Net into 23 blocks: 0 (time / label embeddings), 1-9 (`input_blocks.0-8`), 10-12
(`middle_block.0-2`), 13-21 (`output_blocks.0-8`) and 22 (`out`). Blocks 0 and 22 hold no LoRA module; they are in
the lists so that `block_dims` & co. have the 23 entries sd-scripts' users write.

- `block_dims` / `block_alphas` (23 comma-separated values) give each block's rank and alpha for Linear and 1x1-conv
  layers; `conv_block_dims` / `conv_block_alphas` the same for 3x3 convs (LoCon). Missing lists default to
  `network_dim` / `network_alpha` (and `conv_dim` / `conv_alpha` for convs), as in sd-scripts.
- `down_lr_weight` / `up_lr_weight` (9 values, or a preset `cosine`, `sine`, `linear`, `reverse_linear`, `zeros`,
  optionally `+<base>`) and `mid_lr_weight` (3 values) multiply the U-Net learning rate of each block. A weight not
  above `block_lr_zero_threshold` (default 0) becomes 0, and a block whose weight is 0 gets no modules at all.

The semantics are sd-scripts' (networks/lora.py); bad strings are `ConfigError`s naming the key, where sd-scripts
would assert or log and carry on with the argument dropped.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from library.errors import ConfigError

logger = logging.getLogger(__name__)

SDXL_NUM_BLOCKS = 9  # input_blocks (and output_blocks) 0-8
SDXL_NUM_MID_BLOCKS = 3  # middle_block 0-2
SDXL_NUM_TOTAL_BLOCKS = 1 + SDXL_NUM_BLOCKS + SDXL_NUM_MID_BLOCKS + SDXL_NUM_BLOCKS + 1  # 23
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
BLOCK_LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
BLOCK_DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
BLOCK_ARGS = BLOCK_LR_KEYS + BLOCK_DIM_KEYS
_TABLE = "--network_args"


@dataclass(frozen=True)
class BlockSettings:
    """Per-block (23 entries) ranks and alphas, and the learning-rate weights when any `*_lr_weight` was given."""

    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float | None] | None
    lr_weights: list[float] | None


def _number(key: str, text: str, cast: type) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text.strip()!r} is not a number (expected comma-separated numbers)", table=_TABLE,
                          key=key) from None
    if cast is int:
        if value != int(value) or value < 0:
            raise ConfigError(f"{text.strip()!r} is not a rank (expected non-negative integers)", table=_TABLE,
                              key=key)
        return int(value)
    return value


def _numbers(key: str, raw: Any, cast: type, empty_is_zero: bool = False) -> list:
    parts = str(raw).split(",")
    return [0.0 if (empty_is_zero and not p.strip()) else _number(key, p, cast) for p in parts]


def _exactly(key: str, values: list, count: int = SDXL_NUM_TOTAL_BLOCKS) -> list:
    if len(values) != count:
        raise ConfigError(f"expected {count} comma-separated values (one per SDXL block: embeddings, input_blocks "
                          f"0-8, middle_block 0-2, output_blocks 0-8, out), got {len(values)}", table=_TABLE, key=key)
    return values


def _preset(key: str, raw: str) -> list[float]:
    """sd-scripts' named down/up weight curves over the 9 blocks, `name+base` adding `base` to each."""
    name, _, base_text = raw.strip().partition("+")
    base = _number(key, base_text, float) if base_text else 0.0
    n = SDXL_NUM_BLOCKS
    ramp = [i / (n - 1) for i in range(n)]
    curves = {
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * n,
    }
    if name not in curves:
        raise ConfigError(f"{raw!r} is neither {SDXL_NUM_BLOCKS} comma-separated weights nor a preset "
                          f"({', '.join(LR_WEIGHT_PRESETS)}, optionally with '+<base>')", table=_TABLE, key=key)
    return [w + base for w in curves[name]]


def _fit(key: str, values: list[float], count: int) -> list[float]:
    """sd-scripts' leniency: extra weights are dropped, missing ones are 1.0 (with a warning either way)."""
    if len(values) > count:
        logger.warning("--network_args %s: %d values given, only the first %d are used", key, len(values), count)
        return values[:count]
    if len(values) < count:
        logger.warning("--network_args %s: %d values given, the remaining %d blocks get 1.0", key, len(values),
                       count - len(values))
        return values + [1.0] * (count - len(values))
    return values


def parse_block_lr_weights(kwargs: Mapping[str, Any]) -> list[float] | None:
    """The 23 per-block learning-rate weights, or None when no `*_lr_weight` is given."""
    down, mid, up = (kwargs.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))
    if down is None and mid is None and up is None:
        if kwargs.get("block_lr_zero_threshold") is not None:
            logger.warning("--network_args block_lr_zero_threshold has no effect without down_lr_weight, "
                           "mid_lr_weight or up_lr_weight")
        return None
    threshold = _number("block_lr_zero_threshold", str(kwargs.get("block_lr_zero_threshold", 0.0)), float)

    def down_or_up(key: str, raw: Any) -> list[float]:
        if raw is None:
            return [1.0] * SDXL_NUM_BLOCKS
        text = str(raw)
        values = _numbers(key, text, float, empty_is_zero=True) if "," in text else _preset(key, text)
        return [w if w > threshold else 0.0 for w in _fit(key, values, SDXL_NUM_BLOCKS)]

    mids = [1.0] * SDXL_NUM_MID_BLOCKS
    if mid is not None:
        mids = [w if w > threshold else 0.0
                for w in _fit("mid_lr_weight", _numbers("mid_lr_weight", mid, float, empty_is_zero=True),
                              SDXL_NUM_MID_BLOCKS)]
    weights = [1.0] + down_or_up("down_lr_weight", down) + mids + down_or_up("up_lr_weight", up) + [1.0]
    logger.info("block-wise learning rate weights (embeddings, input 0-8, middle 0-2, output 0-8, out): %s", weights)
    return weights


def parse_block_settings(
    kwargs: Mapping[str, Any],
    network_dim: int,
    network_alpha: float,
    conv_dim: int | None,
    conv_alpha: float | None,
) -> BlockSettings | None:
    """Per-block ranks/alphas/lr weights from `--network_args`, or None when neither `block_dims` nor any
    `*_lr_weight` is given (sd-scripts' switch for block-wise mode; `block_alphas` & co. alone do nothing)."""
    lr_weights = parse_block_lr_weights(kwargs)
    if kwargs.get("block_dims") is None and lr_weights is None:
        given = [k for k in ("block_alphas", "conv_block_dims", "conv_block_alphas") if kwargs.get(k) is not None]
        if given:
            logger.warning("--network_args %s: no effect without block_dims or a *_lr_weight (as in sd-scripts); "
                           "every block gets network_dim / conv_dim", ", ".join(given))
        return None
    n = SDXL_NUM_TOTAL_BLOCKS

    def listed(key: str, cast: type, default: Any) -> list:
        raw = kwargs.get(key)
        return [default] * n if raw is None else _exactly(key, _numbers(key, raw, cast))

    dims = listed("block_dims", int, int(network_dim))
    alphas = listed("block_alphas", float, float(network_alpha))
    conv_dims: list[int] | None = None
    conv_alphas: list[float | None] | None = None
    if kwargs.get("conv_block_dims") is not None:
        conv_dims = listed("conv_block_dims", int, 0)
        conv_alphas = listed("conv_block_alphas", float, conv_alpha)
    elif conv_dim:
        conv_dims, conv_alphas = [int(conv_dim)] * n, [conv_alpha] * n
    elif kwargs.get("conv_block_alphas") is not None:
        logger.warning("--network_args conv_block_alphas: no effect without conv_block_dims or conv_dim")
    if lr_weights is not None:  # a block that does not learn gets no modules
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weights)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weights)]
    return BlockSettings(dims, alphas, conv_dims, conv_alphas, lr_weights)


__all__ = ["BLOCK_ARGS", "BlockSettings", "LR_WEIGHT_PRESETS", "SDXL_NUM_TOTAL_BLOCKS", "parse_block_lr_weights",
           "parse_block_settings"]
