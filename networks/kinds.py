"""Network kinds: how one layer is adapted, and how its tensors are stored and read back.

A kind is one file that defines its layer module and registers it here (networks/lora_modules.py is the LoRA kind).
The other half of a network is the family's *target table*: which layers of a model are adapted and under which
published names (SDXL: networks/targets.py + `lora.collect_targets`; FLUX: `lora_flux.transformer_targets`). A network
class combines the two: for each target it builds `kind.module_class(name, layer, multiplier, dim, alpha, dropout,
rank_dropout, module_dropout)`, or, where the family publishes several of our layers as one (FLUX's fused qkv),
`kind.fused_module_class(name, layers, ..., split=...)`.

Third-party kinds (LyCORIS' LoKr, LoHa, ...) come as whole network modules instead (networks/protocol.py).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from library.errors import UserError

# (state dict) -> ({module name: rank}, {module name: alpha}) for the modules of this kind found in a file
ShapeReader = Callable[[Mapping[str, torch.Tensor]], tuple[dict[str, int], dict[str, float]]]


@dataclass(frozen=True)
class NetworkKind:
    """One way to adapt a layer. `tensor_keys` are the per-module key suffixes of its files (for messages and
    detection); `read_shapes` gives each module's rank and alpha from a file, so a network can be shaped after it."""

    name: str
    module_class: type[nn.Module]
    read_shapes: ShapeReader
    tensor_keys: tuple[str, ...]
    fused_module_class: type[nn.Module] | None = None

    def matches(self, weights_sd: Mapping[str, torch.Tensor]) -> bool:
        """Whether a state dict holds modules of this kind."""
        return any(key.endswith("." + self.tensor_keys[0]) for key in weights_sd)


_KINDS: dict[str, NetworkKind] = {}


def register_network_kind(kind: NetworkKind) -> NetworkKind:
    """Make `kind` available by name; registering the same name twice is a programming error."""
    existing = _KINDS.get(kind.name)
    if existing is not None and existing != kind:
        raise ValueError(f"network kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def get_network_kind(name: str) -> NetworkKind:
    if name not in _KINDS:
        import networks.lora_modules  # noqa: F401  (registers the built-in kinds)
    try:
        return _KINDS[name]
    except KeyError:
        raise UserError(f"unknown network kind {name!r}; known: {', '.join(sorted(_KINDS))}") from None


def network_kinds() -> list[str]:
    import networks.lora_modules  # noqa: F401

    return sorted(_KINDS)


__all__ = ["NetworkKind", "ShapeReader", "get_network_kind", "network_kinds", "register_network_kind"]
