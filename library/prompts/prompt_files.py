"""The training sampler's `--sample_prompts` file in each of sd-scripts' three forms.

- `.txt` (any other extension too): one prompt per line in this toolkit's prompt language (library.prompts.language),
  plus the training-only options sd-scripts' sampler reads from a line: `--ss` (sampler), `--g` (distilled guidance,
  FLUX), and the Lumina options `--ctr`, `--rcfg`, `--fs`, which are checked and then have no effect here.
- `.toml`: a `[prompt]` table of defaults and one `[[prompt.subset]]` table per image, with sd-scripts' keys
  (`prompt`, `negative_prompt`, `width`, `height`, `seed`, `sample_steps`, `scale`, `guidance_scale`,
  `sample_sampler`, `controlnet_image`, ...).
- `.json`: a list whose items are such tables, or prompt lines as in a `.txt` file.

Table prompts are taken literally (sd-scripts does no templating on them); everything is checked while reading, so
a bad value stops the run before its first step with the file and entry named, not at the first sample.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from library.errors import UserError
from library.prompts.language import Literal, PromptSpec, PromptSyntaxError, Template, parse_prompt_line

# options sd-scripts' training sampler reads from a prompt line that the generation language does not have
LINE_ONLY_OPTIONS = {"ss": "sampler", "g": "guidance_scale", "ctr": "cfg_trunc_ratio", "rcfg": "renorm_cfg",
                     "fs": "flow_shift"}
# Lumina-only options: accepted, checked, without effect on this toolkit's models
NO_EFFECT = ("cfg_trunc_ratio", "renorm_cfg", "flow_shift")


@dataclass
class TrainingPrompt:
    """One entry of a sample-prompt file: the prompt spec plus the per-prompt sampler settings."""

    spec: PromptSpec
    where: str  # "file line 3" / "file [[prompt.subset]] 2": for messages
    sampler: str | None = None  # --ss / sample_sampler: overrides --sample_sampler for this prompt
    guidance_scale: float | None = None  # --g / guidance_scale: FLUX's distilled guidance


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("must be a whole number")
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _seed(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    number = int(value)
    if not 0 <= number < 2 ** 32:
        raise ValueError("must be between 0 and 2**32-1")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


# sd-scripts' table keys -> (PromptSpec field or TrainingPrompt field, converter)
TABLE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "prompt": ("template", _text),
    "negative_prompt": ("negative_template", _text),
    "width": ("width", _positive_int),
    "height": ("height", _positive_int),
    "seed": ("seeds", _seed),
    "sample_steps": ("steps", _positive_int),
    "scale": ("scale", _finite),
    "guidance_scale": ("guidance_scale", _finite),
    "sample_sampler": ("sampler", _text),
    "controlnet_image": ("control_image", _text),
    "cfg_trunc_ratio": ("cfg_trunc_ratio", _finite),
    "renorm_cfg": ("renorm_cfg", _finite),
    "flow_shift": ("flow_shift", _finite),
    "enum": ("enum", int),  # sd-scripts numbers the entries itself; a written one is ignored
}


def read_training_prompts(path: str | Path) -> list[TrainingPrompt]:
    """Every entry of a sample-prompt file (by extension: .toml, .json, else lines), checked."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"prompt file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompt file '{path}': {exc}") from None
    if suffix == ".toml":
        return _from_toml(text, path)
    if suffix == ".json":
        return _from_json(text, path)
    prompts = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            prompts.append(_from_line(line, f"{path} line {line_no}", line_no))
    return prompts


def _from_toml(text: str, path: Path) -> list[TrainingPrompt]:
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list) or not table["subset"]:
        raise UserError(f"{path}: expected a [prompt] table with one or more [[prompt.subset]] tables (sd-scripts' "
                        "sample-prompt TOML), e.g. [prompt] width = 1024 then [[prompt.subset]] prompt = \"a dog\"")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    prompts = []
    for i, sub in enumerate(table["subset"], start=1):
        if not isinstance(sub, dict):
            raise UserError(f"{path} [[prompt.subset]] {i}: expected a table")
        prompts.append(_from_table({**defaults, **sub}, f"{path} [[prompt.subset]] {i}", i))
    return prompts


def _from_json(text: str, path: Path) -> list[TrainingPrompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a JSON list of prompts (objects with a \"prompt\" key, or prompt lines)")
    prompts = []
    for i, item in enumerate(data, start=1):
        where = f"{path} item {i}"
        if isinstance(item, str):
            prompts.append(_from_line(item, where, i))
        elif isinstance(item, dict):
            prompts.append(_from_table(item, where, i))
        else:
            raise UserError(f"{where}: expected an object or a prompt string, got {item!r}")
    return prompts


def _from_table(table: dict[str, Any], where: str, index: int) -> TrainingPrompt:
    spec_values: dict[str, Any] = {"raw": json.dumps(table, ensure_ascii=False, default=str), "line_no": index}
    extra: dict[str, Any] = {}
    for key, value in table.items():
        if key not in TABLE_KEYS:
            known = ", ".join(k for k in TABLE_KEYS if k != "enum")
            raise UserError(f"{where}: unknown key '{key}' (known: {known})")
        field_name, convert = TABLE_KEYS[key]
        try:
            converted = convert(value)
        except (TypeError, ValueError) as exc:
            detail = str(exc) if "must" in str(exc) else "wrong type"
            raise UserError(f"{where}: bad value {value!r} for '{key}': {detail}") from None
        if field_name in ("template", "negative_template"):
            spec_values[field_name] = Template(nodes=(Literal(converted),), source=converted) if converted else \
                Template(nodes=(), source="")
        elif field_name == "seeds":
            spec_values["seeds"] = (converted,)
        elif field_name in ("sampler", "guidance_scale"):
            extra[field_name] = converted
        elif field_name in ("enum",) + NO_EFFECT:
            continue
        else:
            spec_values[field_name] = converted
    if "template" not in spec_values:
        raise UserError(f"{where}: no 'prompt'")
    return TrainingPrompt(PromptSpec(**spec_values), where, **extra)


def _from_line(line: str, where: str, line_no: int) -> TrainingPrompt:
    """A prompt line: the training-only options are taken out, the rest goes to the prompt language's parser."""
    from library.prompts.language import _option_starts

    text = line.rstrip("\r\n")
    starts = _option_starts(text)
    kept, extra = [], {}
    cut = starts[0] if starts else len(text)
    kept.append(text[:cut])
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        part = text[start:end]
        name, _, value = part[2:].partition(" ")
        field_name = LINE_ONLY_OPTIONS.get(name.lower())
        if field_name is None:
            kept.append(part)
            continue
        value = value.strip()
        if not value:
            raise UserError(f"{where}: option '--{name}' needs a value")
        if field_name != "sampler":
            try:
                number = _finite(value)
            except ValueError:
                raise UserError(f"{where}: bad value '{value}' for '--{name}': expected a number") from None
            if field_name == "guidance_scale":
                extra["guidance_scale"] = number
        else:
            extra["sampler"] = value
    rest = " ".join(p.strip() for p in kept if p.strip())
    try:
        spec = replace(parse_prompt_line(rest), raw=text, line_no=line_no)
    except PromptSyntaxError as exc:
        raise exc.with_location(where) from None
    return TrainingPrompt(spec, where, **extra)
