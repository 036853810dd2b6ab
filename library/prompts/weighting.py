"""sd-scripts' (A1111's) attention syntax in prompts: which part of a prompt gets which weight.

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; they nest and multiply.
* ``(text:1.3)`` multiplies it by 1.3 instead.
* ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; a closer without its opener is text.
* A bracket never closed weights everything after it (as sd-scripts does, rather than failing).
* ``BREAK`` (the upper-case word) ends the current 75-token chunk: the rest starts a new one.

`parse_attention` returns the prompt as (text, weight) runs and `weighted_tokens` turns them into token ids with one
weight each; the generator's long-prompt encoder (library/sample/long_prompt.py) and training's weighted captions
(library/families/sdxl_text.py) both use them.
"""
from __future__ import annotations

import re
from typing import Any

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = "BREAK"

# one lexical unit: an escape, a bracket, a weighted closer ":1.2)", plain text, or a lone ':' or '\'
_UNIT_RE = re.compile(r"\\[()\[\]\\]|[(\[\])]|:([+-]?[.\d]+)\)|[^\\()\[\]:]+|[:\\]")
_BREAK_RE = re.compile(r"\bBREAK\b")


def has_attention_syntax(text: str) -> bool:
    """True when the prompt weights words or breaks chunks, i.e. when the plain encoder would read it wrongly."""
    return any(c in text for c in "()[]") or bool(_BREAK_RE.search(text))


def parse_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as runs of (text, weight); neighbouring runs of equal weight are joined, BREAK stays alone."""
    runs: list[list] = []
    open_round: list[int] = []  # index in runs where each open bracket started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for piece in _split_breaks(text):
        if piece == BREAK:
            runs.append([BREAK, 1.0])
            continue
        for m in _UNIT_RE.finditer(piece):
            unit, weight = m.group(0), m.group(1)
            if unit.startswith("\\") and len(unit) == 2:
                runs.append([unit[1], 1.0])
            elif unit == "(":
                open_round.append(len(runs))
            elif unit == "[":
                open_square.append(len(runs))
            elif weight is not None and open_round:
                scale_from(open_round.pop(), _to_float(weight))
            elif unit == ")" and open_round:
                scale_from(open_round.pop(), ROUND_MULTIPLIER)
            elif unit == "]" and open_square:
                scale_from(open_square.pop(), SQUARE_MULTIPLIER)
            else:
                runs.append([unit, 1.0])
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)
    merged: list[tuple[str, float]] = []
    for chunk, weight in runs:
        if merged and merged[-1][1] == weight and BREAK not in (chunk, merged[-1][0]):
            merged[-1] = (merged[-1][0] + chunk, weight)
        else:
            merged.append((chunk, weight))
    return merged or [("", 1.0)]


def weighted_tokens(tokenizer: Any, text: str, limit: int) -> tuple[list[int], list[float], bool]:
    """(token ids without BOS/EOS, one weight per token, truncated?) for at most `limit` tokens."""
    ids: list[int] = []
    weights: list[float] = []
    width = tokenizer.model_max_length
    for chunk, weight in parse_attention(text):
        if chunk.strip() == BREAK:  # pad up to the next chunk boundary, counted as sd-scripts counts it
            pad = width - len(ids) % width
            ids += [tokenizer.pad_token_id] * pad
            weights += [1.0] * pad
            continue
        tokens = tokenizer(chunk).input_ids[1:-1]
        ids += tokens
        weights += [weight] * len(tokens)
    truncated = len(ids) > limit
    return ids[:limit], weights[:limit], truncated


def _split_breaks(text: str) -> list[str]:
    """The text with each BREAK word as its own piece (weights still apply across it)."""
    pieces: list[str] = []
    last = 0
    for m in _BREAK_RE.finditer(text):
        pieces += [text[last:m.start()], BREAK]
        last = m.end()
    pieces.append(text[last:])
    return [p for p in pieces if p]


def _to_float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 1.0  # "(a:.)" has no number: sd-scripts' parser would fail; keep the text unweighted


__all__ = ["BREAK", "has_attention_syntax", "parse_attention", "weighted_tokens"]
