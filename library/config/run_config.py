"""`--config_file run.toml`: argument values from TOML (sections flattened), overridden by command-line flags."""
from __future__ import annotations

import argparse
import difflib
import os
from typing import Any, Sequence

import toml

from library.errors import ConfigError
from library.fileio import write_text_atomic


def _flatten(table: dict[str, Any], file: str, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Flatten nested sections; each value keeps the section it came from for error messages."""
    out: dict[str, tuple[Any, str]] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, file, f"{prefix}{key}."))
        else:
            if key in out:
                raise ConfigError("the argument is set twice", file=file, table=prefix.rstrip(".") or "top level",
                                  key=key)
            out[key] = (value, prefix.rstrip(".") or "top level")
    return out


def read_run_config(path: str) -> dict[str, tuple[Any, str]]:
    if not os.path.isfile(path):
        raise ConfigError("file not found", file=path)
    try:
        with open(path, encoding="utf-8") as f:
            return _flatten(toml.load(f), path)
    except toml.TomlDecodeError as e:
        raise ConfigError(f"invalid TOML at line {e.lineno}, column {e.colno}: {e.msg}", file=path) from None


def _coerce(action: argparse.Action, value: Any, file: str, section: str) -> Any:
    key = action.dest
    if action.nargs in ("*", "+"):
        values = value if isinstance(value, list) else [value]
        return [_coerce_scalar(action, v, file, section, key) for v in values]
    if isinstance(value, list):
        raise ConfigError(f"expected a single value, got a list {value!r}", file=file, table=section, key=key)
    return _coerce_scalar(action, value, file, section, key)


def _coerce_scalar(action: argparse.Action, value: Any, file: str, section: str, key: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", file=file, table=section, key=key)
        return value
    if action.type is not None:
        tname = getattr(action.type, "__name__", str(action.type))
        numeric = action.type in (int, float)
        if numeric and (isinstance(value, (bool, str)) or (action.type is int and isinstance(value, float)
                                                           and not value.is_integer())):
            raise ConfigError(f"expected {tname}, got {value!r}", file=file, table=section, key=key)
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected {tname}, got {value!r}", file=file, table=section, key=key) from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"expected one of {list(action.choices)}, got {value!r}", file=file, table=section, key=key)
    return value


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; values from --config_file become defaults, so explicit flags win (sd-scripts semantics)."""
    first, _ = parser.parse_known_args(argv)
    config_file = getattr(first, "config_file", None)
    if config_file and not getattr(first, "output_config", False):
        if not config_file.endswith(".toml") and not os.path.exists(config_file) and os.path.exists(config_file + ".toml"):
            config_file += ".toml"
        actions = {a.dest: a for a in parser._actions if a.dest != "help"}
        defaults = {}
        for key, (value, section) in read_run_config(config_file).items():
            if key not in actions:
                close = difflib.get_close_matches(key, list(actions), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown argument{hint}", file=config_file, table=section, key=key)
            defaults[key] = _coerce(actions[key], value, config_file, section)
        parser.set_defaults(**defaults)
        for a in parser._actions:  # a required flag given by the file is no longer required on the command line
            if a.dest in defaults:
                a.required = False
    return parser.parse_args(argv)


def write_run_config(args: argparse.Namespace, path: str, exclude: Sequence[str] = ("config_file", "output_config")) -> None:
    """Write the arguments as a flat TOML (None values omitted: TOML has no null)."""
    data = {k: v for k, v in sorted(vars(args).items()) if v is not None and k not in exclude}
    write_text_atomic(path, toml.dumps(data), newline=None)
