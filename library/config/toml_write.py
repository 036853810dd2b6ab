"""Writing the TOML this project hands users or itself: flat run configs and the sd-scripts dataset layout.

Small enough that a TOML writer library would add a dependency, not clarity; one place so that the run-config
writer, tools/write_dataset_config.py, the demo and the tests render values the same way."""
from __future__ import annotations

import json
import math
from typing import Any


def toml_value(value: Any) -> str:
    """One scalar or list of scalars as TOML; strings as JSON strings, whose escapes are a subset of TOML's."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _table(lines: list[str], header: str, table: dict[str, Any]) -> None:
    lines.append(header)
    lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items() if key != "subsets")


def dumps_dataset_config(config: dict[str, Any]) -> str:
    """The sd-scripts dataset layout: an optional ``[general]`` table, then each ``[[datasets]]`` with its
    ``subsets`` (a list of tables) as ``[[datasets.subsets]]``."""
    lines: list[str] = []
    if config.get("general"):
        _table(lines, "[general]", config["general"])
    for dataset in config["datasets"]:
        lines.append("")
        _table(lines, "[[datasets]]", dataset)
        for subset in dataset["subsets"]:
            lines.append("")
            _table(lines, "  [[datasets.subsets]]", subset)
    return "\n".join(lines).lstrip("\n") + "\n"
