"""Read a TOML file (run config or dataset config) into a dict, or fail with one ConfigError naming file and line.

Both kinds of config are read here so that they fail alike: the stdlib parser (tomllib, strict TOML 1.0), a UTF-8
byte-order mark accepted (Windows editors write one; left in place it would become part of the first key), a byte that
is not UTF-8 reported with its line, and every syntax error with its line and column.
"""
from __future__ import annotations

import codecs
import os
import tomllib
from typing import Any

from library.errors import ConfigError


def read_toml(path: str, what: str = "config file") -> dict[str, Any]:
    """Parse `path`; `what` names the file's role in messages (e.g. "dataset config file")."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found", file=path)
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"line {line}: byte 0x{data[e.start]:02x} is not UTF-8 text; save the file as UTF-8",
                          file=path) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{_describe(e, text)}; fix the TOML syntax there", file=path) from None


def _describe(e: tomllib.TOMLDecodeError, text: str) -> str:
    """tomllib's message ends with '(at line L, column C)' or '(at end of document)'; put the place first."""
    message = str(e)
    what, _, where = message.rpartition(" (at ")
    if not what:
        return f"TOML syntax error: {message}"
    where = where.rstrip(")")
    if where == "end of document":
        last = len(text.rstrip("\n").splitlines()) or 1
        where = f"line {last} (the end of the file)"
    return f"{where}: TOML syntax error: {what}"
