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

import math
import random
import re

from library.data.types import SubsetConfig

JOINER = ", "  # sd-scripts joins with ", " whatever caption_separator is


def caption_ops_active(subset: SubsetConfig) -> bool:
    """True when a subset's captions can change from one epoch to the next, so text-encoder outputs can't be cached."""
    return bool(
        subset.shuffle_caption
        or subset.caption_dropout_rate > 0
        or subset.caption_dropout_every_n_epochs > 0
        or subset.caption_tag_dropout_rate > 0
        or subset.enable_wildcard
        or subset.token_warmup_step > 0
    )


def process_caption(caption: str, subset: SubsetConfig, rng: random.Random, epoch: int,
                    step: int | None = None, max_train_steps: int | None = None) -> str:
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

    caption = expand_wildcards(caption, rng) if subset.enable_wildcard else caption.split("\n")[0]
    warmup = warmup_steps(subset, max_train_steps)
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or warmup > 0:
        fixed, free, tail = split_tokens(caption, subset)
        if warmup > 0 and step is not None and step < warmup:
            free = free[:warmup_token_count(len(free), subset.token_warmup_min, warmup, step)]
        if subset.shuffle_caption:
            rng.shuffle(free)
        if subset.caption_tag_dropout_rate > 0:
            free = [t for t in free if rng.random() >= subset.caption_tag_dropout_rate]
        caption = JOINER.join(fixed + free + tail)
    if subset.secondary_separator:
        # tags joined by the secondary separator moved and dropped as one; now they become ordinary tags
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """enable_wildcard: one random line of a multi-line caption, then each `{a|b|c}` replaced by one of its
    choices; `{{` and `}}` stand for literal braces."""
    lines = caption.split("\n")
    caption = rng.choice(lines) if len(lines) > 1 else caption
    open_mark, close_mark = "\x00<", ">\x00"  # NUL never occurs in a caption file's text
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def warmup_steps(subset: SubsetConfig, max_train_steps: int | None) -> int:
    """token_warmup_step in steps: a value below 1 is a fraction of the run's steps (sd-scripts' rule)."""
    value = subset.token_warmup_step
    if value <= 0:
        return 0
    if value < 1:
        return math.floor(value * max_train_steps) if max_train_steps else 0
    return int(value)


def warmup_token_count(n_free: int, minimum: int, warmup: int, step: int) -> int:
    """How many free tags a caption keeps at `step` of a token warm-up: from `minimum` at step 0, growing linearly
    to all of them at step `warmup`."""
    return math.floor(step * ((n_free - minimum) / warmup)) + minimum


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
