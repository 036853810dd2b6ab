"""Generation parameters stored in PNG text chunks, readable by us, by sd-scripts users' tools and by A1111 users.

We write two views of the same facts: sd-scripts' separate chunks (``prompt``, ``negative-prompt``, ``seed``,
``steps``, ``scale``, ``sampler``, ...), which tools such as the evaluator and the caption writer read exactly, and
an A1111-style ``parameters`` chunk, which image browsers and web UIs show. Reading prefers our chunks and falls back
to parsing ``parameters`` so that images made by other tools work too.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from library.errors import UserError
from library.fileio import atomic_path
from library.prompts.samplers import SAMPLER_ALIASES, SAMPLERS, a1111_sampler_label, sampler_from_a1111_label

# chunk names, as sd-scripts' generation scripts write them
KEY_PROMPT = "prompt"
KEY_NEGATIVE = "negative-prompt"
KEY_SEED = "seed"
KEY_STEPS = "steps"
KEY_SCALE = "scale"
KEY_SAMPLER = "sampler"
KEY_MODEL = "model"
KEY_PARAMETERS = "parameters"  # A1111
_OWN_KEYS = {KEY_PROMPT, KEY_NEGATIVE, KEY_SEED, KEY_STEPS, KEY_SCALE, KEY_SAMPLER, KEY_MODEL, KEY_PARAMETERS}

# "Key: value" pairs of A1111's last line; a value may be a quoted string holding commas
_A1111_PAIR_RE = re.compile(r'\s*([\w][\w \-/]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEGATIVE_PREFIX = "Negative prompt:"


@dataclass
class GenerationInfo:
    """What made an image. `sampler` is the sd-scripts name (e.g. 'euler_a') when known, else the label read."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    scale: float | None = None
    sampler: str | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _sampler_label(sampler: str) -> str:
    key = sampler.strip().lower()
    if key in SAMPLERS or key in SAMPLER_ALIASES:
        return a1111_sampler_label(key)
    return sampler  # already a label, or a sampler this table does not know: write it as given


def format_a1111_parameters(info: GenerationInfo) -> str:
    """The A1111 ``parameters`` text: prompt, then ``Negative prompt:`` (if any), then one line of settings."""
    lines = [info.prompt]
    if info.negative_prompt:
        lines.append(f"{_NEGATIVE_PREFIX} {info.negative_prompt}")
    settings: list[str] = []
    if info.steps is not None:
        settings.append(f"Steps: {info.steps}")
    if info.sampler:
        settings.append(f"Sampler: {_sampler_label(info.sampler)}")
    if info.scale is not None:
        settings.append(f"CFG scale: {info.scale:g}")
    if info.seed is not None:
        settings.append(f"Seed: {info.seed}")
    if info.width is not None and info.height is not None:
        settings.append(f"Size: {info.width}x{info.height}")
    if info.model:
        settings.append(f"Model: {_quote_if_needed(info.model)}")
    if settings:
        lines.append(", ".join(settings))
    return "\n".join(lines)


def _quote_if_needed(value: str) -> str:
    if "," in value or ":" in value or '"' in value:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def save_png_with_info(image: Image.Image, path: str | os.PathLike, info: GenerationInfo) -> Path:
    """Write `image` as PNG with the generation info; atomic (temp file + rename), so readers never see half a file.

    Width and height default to the image's size. `info.extra` items become chunks of their own.
    """
    path = Path(path)
    if info.width is None or info.height is None:
        info = GenerationInfo(**{**info.__dict__, "width": image.width, "height": image.height})
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text(KEY_PROMPT, info.prompt)
    chunks.add_text(KEY_NEGATIVE, info.negative_prompt or "")
    if info.seed is not None:
        chunks.add_text(KEY_SEED, str(info.seed))
    if info.steps is not None:
        chunks.add_text(KEY_STEPS, str(info.steps))
    if info.scale is not None:
        chunks.add_text(KEY_SCALE, f"{info.scale:g}")
    if info.sampler:
        chunks.add_text(KEY_SAMPLER, info.sampler)
    if info.model:
        chunks.add_text(KEY_MODEL, info.model)
    for key, value in info.extra.items():
        if key in _OWN_KEYS:
            raise ValueError(f"extra metadata key '{key}' would overwrite a standard chunk")
        chunks.add_text(key, str(value))
    chunks.add_text(KEY_PARAMETERS, format_a1111_parameters(info))

    with atomic_path(path) as tmp_name:
        image.save(tmp_name, format="PNG", pnginfo=chunks)
    return path


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _from_own_chunks(text: dict[str, str], size: tuple[int, int]) -> GenerationInfo:
    from_parameters = parse_a1111_parameters(text[KEY_PARAMETERS]) if KEY_PARAMETERS in text else None
    return GenerationInfo(
        prompt=text[KEY_PROMPT],
        negative_prompt=text.get(KEY_NEGATIVE, ""),
        seed=_int_or_none(text.get(KEY_SEED)),
        steps=_int_or_none(text.get(KEY_STEPS)),
        scale=_float_or_none(text.get(KEY_SCALE)),
        sampler=text.get(KEY_SAMPLER) or None,
        width=size[0],
        height=size[1],
        model=text.get(KEY_MODEL) or (from_parameters.model if from_parameters else None),
        extra={k: v for k, v in text.items() if k not in _OWN_KEYS},
    )


def parse_a1111_parameters(parameters: str) -> GenerationInfo:
    """Parse A1111's ``parameters`` text. Settings A1111 writes that we have no field for go to `extra`."""
    lines = parameters.strip("\n").split("\n")
    settings: dict[str, str] = {}
    if lines and _looks_like_settings(lines[-1]):
        settings = _parse_settings(lines.pop())
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith(_NEGATIVE_PREFIX):
            target = negative_lines
            line = line[len(_NEGATIVE_PREFIX) :].lstrip()
        target.append(line)
    width = height = None
    size = settings.pop("Size", None)
    if size and re.fullmatch(r"\d+x\d+", size):
        width, height = (int(v) for v in size.split("x"))
    sampler_label = settings.pop("Sampler", None)
    return GenerationInfo(
        prompt="\n".join(prompt_lines),
        negative_prompt="\n".join(negative_lines),
        seed=_int_or_none(settings.pop("Seed", None)),
        steps=_int_or_none(settings.pop("Steps", None)),
        scale=_float_or_none(settings.pop("CFG scale", None)),
        sampler=(sampler_from_a1111_label(sampler_label) or sampler_label) if sampler_label else None,
        width=width,
        height=height,
        model=settings.pop("Model", None),
        extra=settings,
    )


def _looks_like_settings(line: str) -> bool:
    # A1111 accepts a last line as settings when it holds at least three "Key: value" pairs
    return len(_A1111_PAIR_RE.findall(line)) >= 3


def _parse_settings(line: str) -> dict[str, str]:
    settings: dict[str, str] = {}
    for key, value in _A1111_PAIR_RE.findall(line):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        settings[key.strip()] = value
    return settings


def read_png_info(path: str | os.PathLike) -> GenerationInfo | None:
    """The generation info of an image, or None when it holds none (no ``prompt`` and no ``parameters``)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", None) or {})
            if not text:  # non-PNG images keep string info (if any) in .info
                text = {k: v for k, v in image.info.items() if isinstance(v, str)}
            size = image.size
    except FileNotFoundError:
        raise UserError(f"image '{path}' does not exist") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image '{path}': {exc}") from None
    if KEY_PROMPT in text:
        return _from_own_chunks(text, size)
    if KEY_PARAMETERS in text:
        info = parse_a1111_parameters(text[KEY_PARAMETERS])
        if info.width is None or info.height is None:
            info.width, info.height = size
        return info
    return None


__all__ = [
    "GenerationInfo",
    "format_a1111_parameters",
    "parse_a1111_parameters",
    "read_png_info",
    "save_png_with_info",
]
