"""Per-epoch caption transforms with sd-scripts' semantics, so captions written for kohya trainers mean the same here.

Order (as sd-scripts' `process_caption`): caption_prefix / caption_suffix are joined on with a space first (so they
take part in shuffling: with keep_tokens, a prefix counts as kept tokens); then whole-caption dropout
(caption_dropout_rate, caption_dropout_every_n_epochs) empties it; otherwise only the first line is used, and when
shuffle or tag dropout is on the caption is split on caption_separator into kept tokens (the first keep_tokens, or
the part before keep_tokens_separator, plus an optional fixed tail after a second separator) and free tokens, the
free ones are shuffled, then each dropped with caption_tag_dropout_rate, and all are joined with ", ".
All randomness comes from the `rng` argument, so a caption is reproducible from (seed, epoch, index).
"""
from __future__ import annotations

import random

from library.data.types import SubsetConfig

JOINER = ", "  # sd-scripts joins with ", " whatever caption_separator is


def caption_ops_active(subset: SubsetConfig) -> bool:
    """True when a subset's captions can change from one epoch to the next, so text-encoder outputs can't be cached."""
    return bool(
        subset.shuffle_caption
        or subset.caption_dropout_rate > 0
        or subset.caption_dropout_every_n_epochs > 0
        or subset.caption_tag_dropout_rate > 0
    )


def process_caption(caption: str, subset: SubsetConfig, rng: random.Random, epoch: int) -> str:
    """The caption the text encoder sees for this sample in this epoch (`epoch` counts from 0, as the loop does;
    caption_dropout_every_n_epochs = n empties captions in epochs n, 2n, ... counted from 1, as sd-scripts does)."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix

    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and (epoch + 1) % every == 0):
        return ""

    caption = caption.split("\n")[0]
    if not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0):
        return caption

    fixed, free, tail = split_tokens(caption, subset)
    if subset.shuffle_caption:
        rng.shuffle(free)
    if subset.caption_tag_dropout_rate > 0:
        free = [t for t in free if rng.random() >= subset.caption_tag_dropout_rate]
    return JOINER.join(fixed + free + tail)


def split_tokens(caption: str, subset: SubsetConfig) -> tuple[list[str], list[str], list[str]]:
    """(kept head, free middle, kept tail). keep_tokens_separator, when present in the caption, wins over
    keep_tokens: "a, b ||| c, d ||| e" keeps "a, b" first and "e" last and frees "c, d"."""
    sep = subset.caption_separator
    marker = subset.keep_tokens_separator
    if marker and marker in caption:
        head, rest = caption.split(marker, 1)
        tail = ""
        if marker in rest:
            rest, tail = rest.split(marker, 1)
        return _tokens(head, sep), _tokens(rest, sep), _tokens(tail, sep)
    tokens = [t.strip() for t in caption.strip().split(sep)]
    k = max(subset.keep_tokens, 0)
    return tokens[:k], tokens[k:], []


def _tokens(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]
