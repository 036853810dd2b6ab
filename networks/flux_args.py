"""sd-scripts' FLUX-only `--network_args` (networks/lora_flux.py there): which layers get which rank, and which
modules learn at which rate.

- Per layer type ranks: `img_attn_dim`, `txt_attn_dim`, `img_mlp_dim`, `txt_mlp_dim`, `img_mod_dim`, `txt_mod_dim`
  (double blocks), `single_dim` (single blocks' linear1/linear2), `single_mod_dim` (single blocks' modulation).
  0 leaves that layer type out.
- `in_dims` = `[img, time, vector, guidance, txt]`: ranks for the input layers outside the blocks (0 = none).
- `train_double_block_indices` / `train_single_block_indices`: `all`, `none`, or indices and ranges, e.g. `0-3,7`.
- `network_reg_dims` / `network_reg_lrs`: `regex=value,regex=value`; the first regex found in a module name gives
  that module's rank / learning rate.

Bad values are `ConfigError`s that name the key (sd-scripts asserts, or logs and drops the pair).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from library.errors import ConfigError

_TABLE = "--network_args"
TYPE_DIM_KEYS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                 "single_dim", "single_mod_dim")
# what a module name must contain for each type dim, in sd-scripts' order (the first match wins)
TYPE_DIM_IDENTIFIERS: tuple[tuple[str, ...], ...] = (("img_attn",), ("txt_attn",), ("img_mlp",), ("txt_mlp",),
                                                     ("img_mod",), ("txt_mod",), ("single_blocks", "linear"),
                                                     ("modulation",))
# in_dims order and the kohya-name fragments of those input layers
IN_DIM_FILTERS = ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")
BLOCK_INDEX_KEYS = ("train_double_block_indices", "train_single_block_indices")
REGEX_KEYS = ("network_reg_dims", "network_reg_lrs")


def rank(key: str, raw: Any) -> int:
    try:
        value = float(str(raw).strip())
        if value != int(value) or value < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"expected a non-negative integer rank, got {raw!r}", table=_TABLE, key=key) from None
    return int(value)


def parse_in_dims(raw: Any) -> list[int]:
    """`[a,b,c,d,e]` or `a,b,c,d,e`: ranks of img_in, time_in, vector_in, guidance_in, txt_in."""
    text = str(raw).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    dims = [rank("in_dims", part) for part in text.split(",")]
    if len(dims) != len(IN_DIM_FILTERS):
        raise ConfigError(f"expected 5 ranks (img, time, vector, guidance, txt), got {len(dims)}", table=_TABLE,
                          key="in_dims")
    return dims


def parse_block_selection(key: str, raw: Any, total: int) -> list[bool]:
    """`all`, `none` / empty, or comma-separated indices and `a-b` ranges (inclusive) of `total` blocks."""
    text = str(raw).strip()
    if text == "all":
        return [True] * total
    if text in ("none", ""):
        return [False] * total
    selected = [False] * total
    for part in text.split(","):
        start_text, dash, end_text = part.partition("-")
        try:
            start = int(start_text.strip())
            end = int(end_text.strip()) if dash else start
        except ValueError:
            raise ConfigError(f"{part.strip()!r} is not a block index or range (e.g. 0-3,7)", table=_TABLE,
                              key=key) from None
        if not (0 <= start <= end < total):
            raise ConfigError(f"{part.strip()!r} is outside this model's {total} blocks (0-{total - 1})",
                              table=_TABLE, key=key)
        for i in range(start, end + 1):
            selected[i] = True
    return selected


def parse_regex_values(key: str, raw: Any, cast: type) -> dict[str, float]:
    """`regex=value,regex=value` in order; each regex must compile and each value be a number (a rank for dims)."""
    out: dict[str, float] = {}
    for pair in str(raw).split(","):
        pair = pair.strip()
        if not pair:
            continue
        pattern, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError(f"expected regex=value pairs separated by commas, got {pair!r}", table=_TABLE, key=key)
        try:
            re.compile(pattern.strip())
        except re.error as e:
            raise ConfigError(f"{pattern.strip()!r} is not a regular expression ({e})", table=_TABLE,
                              key=key) from None
        if cast is int:
            out[pattern.strip()] = rank(key, value)
        else:
            try:
                out[pattern.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"{value.strip()!r} is not a learning rate", table=_TABLE, key=key) from None
    return out


def first_match(patterns: Mapping[str, float] | None, name: str) -> tuple[int, float] | None:
    """(position, value) of the first pattern found in `name`, as sd-scripts picks it."""
    for i, (pattern, value) in enumerate((patterns or {}).items()):
        if re.search(pattern, name):
            return i, value
    return None


def type_dim(type_dims: list[int | None] | None, name: str) -> int | None:
    """The per-layer-type rank of a FLUX block module, None when no type dim applies."""
    for d, identifiers in zip(type_dims or [], TYPE_DIM_IDENTIFIERS):
        if d is not None and all(part in name for part in identifiers):
            return d
    return None


__all__ = ["BLOCK_INDEX_KEYS", "IN_DIM_FILTERS", "REGEX_KEYS", "TYPE_DIM_KEYS", "first_match", "parse_block_selection",
           "parse_in_dims", "parse_regex_values", "rank", "type_dim"]
