"""Each command-line flag declared once, as a field of the typed config it fills.

A flag is a dataclass field whose default is `flag(...)`: the field's name is the flag's name, its annotation gives the
type (`bool` -> store_true, `list[T]` -> nargs="*"), and the metadata carries the help text, choices, nargs and the
parser default. From these declarations come the argparse groups (`add_flag_group`), the typed configs
(`config_from_namespace`) and the `--config_file` reader's type checks (it uses the parser's actions), so a new flag
is one line in the dataclass of its concern and nothing else.

Two defaults per flag, on purpose: `default` is what the parser shows and what sd-scripts' parser has (users' configs
and the flag-set test compare against it); `unset` is what the run uses when the flag keeps that default, for flags
whose sd-scripts default means "pick something" (e.g. `--optimizer_type ""` means AdamW, `--output_name` unset means
"last"). The dataclass default is the value the run uses, so configs built in code behave like a plain command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")

FLAG = "flag"  # the metadata key of a flag field
_NO_UNSET = object()


@dataclass(frozen=True)
class FlagSpec:
    """What argparse needs beyond the field's name and annotation."""

    help: str
    default: Any  # the parser's default (sd-scripts' own)
    unset: Any = _NO_UNSET  # the value the run uses while the flag keeps `default`
    choices: tuple[Any, ...] | None = None
    nargs: str | int | None = None
    type: Callable[[str], Any] | None = None  # overrides the annotation's type (e.g. int_or_float)
    dataset_key: str | None = None  # dataset flags: the dataset-TOML key the flag gives a value for
    metavar: str | None = None

    @property
    def has_unset(self) -> bool:
        return self.unset is not _NO_UNSET


def flag(default: Any, help: str, *, unset: Any = _NO_UNSET, choices: Sequence[Any] | None = None,
         nargs: str | int | None = None, type: Callable[[str], Any] | None = None, dataset_key: str | None = None,
         metavar: str | None = None) -> Any:
    """Declare a flag as a dataclass field (see the module docstring for `default` versus `unset`)."""
    spec = FlagSpec(help=help, default=default, unset=unset, choices=tuple(choices) if choices is not None else None,
                    nargs=nargs, type=type, dataset_key=dataset_key, metavar=metavar)
    value = unset if spec.has_unset else default
    if isinstance(value, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(_copy, value), metadata={FLAG: spec})
    return dataclasses.field(default=value, metadata={FLAG: spec})


def _copy(value: Any) -> Any:
    return type(value)(value)


# ---- argparse types with sd-scripts' names (the flag-set test compares type names) -------------------------------

def int_or_float(value: str) -> int | float:
    """sd-scripts' type for step counts that may be a fraction of the total (e.g. --lr_warmup_steps 0.1)."""
    try:
        return int(value)
    except ValueError:
        return float(value)


def Path(value: str) -> str:  # noqa: N802 - named as sd-scripts' type so parsers compare equal
    """A file path (sd-scripts parses it as pathlib.Path; the configs keep strings)."""
    return str(value)


# ---- reading declarations ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlagField:
    name: str
    spec: FlagSpec
    annotation: Any


def flag_fields(cls: type) -> Iterator[FlagField]:
    """The flag fields of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(FLAG)
        if spec is not None:
            yield FlagField(f.name, spec, hints[f.name])


def _strip_optional(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def argparse_kwargs(ff: FlagField) -> dict[str, Any]:
    """The add_argument keyword arguments of one flag field."""
    spec, base = ff.spec, _strip_optional(ff.annotation)
    kwargs: dict[str, Any] = {"dest": ff.name, "help": _help(spec)}
    if base is bool:
        kwargs["action"] = "store_false" if spec.default else "store_true"
        return kwargs
    kwargs["default"] = spec.default
    if typing.get_origin(base) is list:
        kwargs["nargs"] = spec.nargs or "*"
        base = typing.get_args(base)[0]
    elif spec.nargs is not None:
        kwargs["nargs"] = spec.nargs
    kwargs["type"] = spec.type or base
    if spec.choices is not None:
        kwargs["choices"] = list(spec.choices)
    if spec.metavar:
        kwargs["metavar"] = spec.metavar
    return kwargs


def _help(spec: FlagSpec) -> str:
    text = spec.help
    if spec.has_unset and spec.unset not in (None, [], "") and "unset:" not in text:
        text += f" (unset: {spec.unset})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_flag_group(parser: argparse.ArgumentParser, cls: type, title: str | None = None,
                   only: Sequence[str] | None = None) -> None:
    """Add a config dataclass's flags as one argparse group (`only`: a subset of them, by name)."""
    group = parser.add_argument_group(title or _title(cls))
    for ff in flag_fields(cls):
        if only is None or ff.name in only:
            group.add_argument(f"--{ff.name}", **argparse_kwargs(ff))


def _title(cls: type) -> str:
    doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    return doc.rstrip(".")


def config_from_namespace(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Build a config dataclass from parsed flags: a flag left at its parser default gives the field its `unset`
    value; fields the namespace lacks keep their defaults; `overrides` win."""
    specs = {ff.name: ff.spec for ff in flag_fields(cls)}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not hasattr(ns, f.name) or f.name in overrides:
            continue
        value = getattr(ns, f.name)
        spec = specs.get(f.name)
        if spec is not None and spec.has_unset and value == spec.default:
            value = _copy(spec.unset) if isinstance(spec.unset, (list, dict)) else spec.unset
        if isinstance(value, PurePath):
            value = str(value)
        values[f.name] = value
    values.update(overrides)
    return cls(**values)
