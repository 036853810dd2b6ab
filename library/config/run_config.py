"""`--config_file run.toml`: flag values from a TOML file (sections flattened), overridden by command-line flags.

The file is read as dataset TOMLs are (library.config.toml_read). Keys that are no flag of this script are what
front ends such as the kohya_ss GUI add (`epoch`, `noise_offset_type`, ...) and sd-scripts ignores them: one warning
lists them, with a "did you mean" for near-misses of real flags, and the run goes on; `--config_strict` makes them an
error instead.
"""
from __future__ import annotations

import argparse
import difflib
import os
from dataclasses import dataclass
from typing import Any, Sequence

from library.config.environment_flags import warn_once
from library.config.flags import flag
from library.config.toml_read import read_toml
from library.config.toml_write import toml_value
from library.errors import ConfigError
from library.fileio import write_text_atomic


@dataclass
class ConfigFileFlags:
    """config file"""

    config_file: str | None = flag(None, "TOML with flag values (sections are flattened; command-line flags win)")
    output_config: bool = flag(False, "write the flags to --config_file and exit")
    config_strict: bool = flag(False, "make keys of --config_file that are no flag of this script an error (default: "
                                      "one warning lists them and the run goes on)")


def _flatten(table: dict[str, Any], file: str, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Flatten nested sections; each value keeps the section it came from for error messages."""
    out: dict[str, tuple[Any, str]] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            for k, v in _flatten(value, file, f"{prefix}{key}.").items():
                if k in out:
                    raise ConfigError("the argument is set twice", file=file, table=v[1], key=k)
                out[k] = v
        else:
            if key in out:
                raise ConfigError("the argument is set twice", file=file, table=prefix.rstrip(".") or "top level",
                                  key=key)
            out[key] = (value, prefix.rstrip(".") or "top level")
    return out


def read_run_config(path: str) -> dict[str, tuple[Any, str]]:
    """Every key of a run TOML with its value and section."""
    return _flatten(read_toml(path, "config file"), path)


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
        if action.type is not str and not numeric and not isinstance(value, str):
            value = str(value)  # types that parse text (int_or_float, Path) get the text argparse would give
            if value in ("True", "False"):
                raise ConfigError(f"expected {tname}, got {value.lower()}", file=file, table=section, key=key)
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"expected {tname}, got {value!r}", file=file, table=section, key=key) from None
    if action.choices is not None and value not in action.choices:
        if value in CONFIG_FILE_EXTRA_CHOICES.get(action.dest, ()):
            return value
        raise ConfigError(f"expected one of {list(action.choices)}, got {value!r}", file=file, table=section, key=key)
    return value


# Values outside a flag's command-line choices that front ends write into run TOMLs and sd-scripts accepts there (it
# does not check choices of config-file values): the kohya_ss GUI writes accelerate's `dynamo_backend = "no"` (no
# compilation; only read with --torch_compile, where it gives a warning and eager mode) and `max_token_length = 75`
# (sd-scripts' default length: one 75-token chunk, as unset).
CONFIG_FILE_EXTRA_CHOICES: dict[str, tuple[Any, ...]] = {"dynamo_backend": ("no", "NO"), "max_token_length": (75,)}


def unknown_keys_message(unknown: dict[str, str], known: Sequence[str], file: str) -> str:
    """One message for all keys that are no flag: each with its section and a near-miss suggestion."""
    parts = []
    for key, section in unknown.items():
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
        where = "" if section == "top level" else f" [{section}]"
        parts.append(f"'{key}'{where}" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"{file}: {len(unknown)} key(s) are no flag of this script: " + ", ".join(parts)


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; values from --config_file become defaults, so explicit flags win (sd-scripts semantics)."""
    first, _ = parser.parse_known_args(argv)
    config_file = getattr(first, "config_file", None)
    if config_file and not getattr(first, "output_config", False):
        if not config_file.endswith(".toml") and not os.path.exists(config_file) and os.path.exists(config_file + ".toml"):
            config_file += ".toml"
        actions = {a.dest: a for a in parser._actions if a.dest != "help"}
        defaults, unknown = {}, {}
        for key, (value, section) in read_run_config(config_file).items():
            if key not in actions:
                unknown[key] = section
                continue
            defaults[key] = _coerce(actions[key], value, config_file, section)
        if unknown:
            message = unknown_keys_message(unknown, list(actions), config_file)
            if getattr(first, "config_strict", False) or defaults.get("config_strict"):
                raise ConfigError(message.split(": ", 1)[1] + "; remove them, or drop --config_strict to have them "
                                  "ignored with a warning", file=config_file)
            warn_once([f"{message}; they are ignored (--config_strict makes them an error)"])
        parser.set_defaults(**defaults)
        for a in parser._actions:  # a required flag given by the file is no longer required on the command line
            if a.dest in defaults:
                a.required = False
    return parser.parse_args(argv)


def write_run_config(args: argparse.Namespace, path: str,
                     exclude: Sequence[str] = ("config_file", "output_config")) -> None:
    """Write the arguments as a flat TOML (None values omitted: TOML has no null)."""
    data = {k: v for k, v in sorted(vars(args).items()) if v is not None and k not in exclude}
    write_text_atomic(path, dumps_flat_toml(data), newline=None)


def dumps_flat_toml(data: dict[str, Any]) -> str:
    """A flat TOML of scalars and lists of scalars (all a run config holds); tomllib reads it back unchanged."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in data.items())
