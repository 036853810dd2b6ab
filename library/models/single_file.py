"""Model configs we store as JSON in a safetensors header (values tensor shapes cannot give, e.g. head counts)."""
from __future__ import annotations

import json
from typing import Any, Mapping

from library.errors import ModelLoadError


def json_config_from_metadata(path: str, metadata: Mapping[str, str] | None, key: str) -> dict[str, Any]:
    """The JSON object under `key`, or {} when the file (e.g. an official checkpoint) has none."""
    raw = (metadata or {}).get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: metadata '{key}' is not valid JSON: {exc}") from None
    return value if isinstance(value, dict) else {}
