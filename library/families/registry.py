"""Where families are found by name (`--model_family`-style lookups from the loop and the generation scripts).

A family registers itself with `@register_family(name)` when its module is imported; `KNOWN_FAMILIES` says which
module to import for a name, so scripts import only the family they run and no module-name convention is assumed.
"""
from __future__ import annotations

import importlib
from typing import Callable

from library.config.model_flags import ModelConfig
from library.errors import UserError
from library.families.interface import ModelFamily

#: family name -> the module that registers it
KNOWN_FAMILIES: dict[str, str] = {"sdxl": "library.families.sdxl", "flux": "library.families.flux"}

_REGISTRY: dict[str, Callable[[ModelConfig | None], ModelFamily]] = {}


def register_family(name: str) -> Callable[[type[ModelFamily]], type[ModelFamily]]:
    def deco(cls: type[ModelFamily]) -> type[ModelFamily]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def get_family(name: str, config: ModelConfig | None = None) -> ModelFamily:
    """A fresh instance of the family registered as `name` (importing its module on first use), bound to `config`
    (the family's own ModelConfig subclass, e.g. FluxModelConfig)."""
    if name not in _REGISTRY and name in KNOWN_FAMILIES:
        importlib.import_module(KNOWN_FAMILIES[name])
    if name not in _REGISTRY:
        raise UserError(f"unknown model family {name!r}; known: {sorted(set(_REGISTRY) | set(KNOWN_FAMILIES))}")
    return _REGISTRY[name](config)
