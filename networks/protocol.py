"""The kohya `--network_module` interface, written down: what a network module must offer to train and generate here.

sd-scripts' `train_network.py` imports the module named by `--network_module` and talks to it only through the
members below; third-party modules (LyCORIS' `lycoris.kohya`, ...) are written against exactly that. This file is the
contract on our side: `library/train/network_adapter.py` and generation (`networks/attach.py`) call nothing else,
and call the optional members only when present, where sd-scripts does.

What the module is handed follows sd-scripts too: `text_encoder` is the list of text encoders (one model for
single-encoder families), `unet` the denoiser. Our own modules (`networks.lora`, `networks.lora_flux`) work on our
diffusers models directly and say so with `NATIVE_MODELS = True`; every other module gets the models as sd-scripts
shows them (networks/model_views.py: SGM names for SDXL, BFL names for FLUX, CLIP with `text_model`).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, Protocol, Union, runtime_checkable

import torch

from library.errors import UserError

#: how sd-scripts hands text encoders to a network module: one encoder, a list of them (SDXL: CLIP-L, CLIP-G;
#: FLUX: CLIP-L, T5), or None
TextEncoders = Union[torch.nn.Module, Sequence[torch.nn.Module], None]

# sd-scripts calls these only after `hasattr` (train_network.py): a module may leave them out.
OPTIONAL_NETWORK_MEMBERS: tuple[str, ...] = (
    "on_step_start",  # before each micro-batch's forward
    "apply_max_norm_regularization",  # after each optimizer step, with --scale_weight_norms
    "set_multiplier",  # generation's --network_mul / per-prompt multipliers
    "is_mergeable",
    "merge_to",  # --network_merge, tools/merge_lora.py
    "prepare_network",  # once, with the run's arguments, before apply_to
)


@runtime_checkable
class Network(Protocol):
    """The object `create_network` returns: a torch module holding the trainable modules, plus these calls.

    Beyond the members below, the trainer uses the `torch.nn.Module` side: `parameters()`, `named_parameters()`,
    `to()`, `train()`, `eval()`, `state_dict()` (checkpointing for --resume).
    """

    def apply_to(self, text_encoder: Any, unet: Any, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Hook the modules into the models; modules of a part not applied are dropped."""

    def prepare_optimizer_params(self, text_encoder_lr: Any, unet_lr: float | None,
                                 default_lr: float | None) -> Any:
        """Parameter groups (a list, or (list, descriptions) as newer modules return)."""

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: Mapping[str, str] | None) -> None:
        """Write the network file (kohya key layout)."""

    def load_weights(self, file: str) -> Any:
        """Load a network file into the applied network; returns something printable."""

    def enable_gradient_checkpointing(self) -> None:
        """Called with --gradient_checkpointing (usually nothing to do)."""

    def prepare_grad_etc(self, text_encoder: Any, unet: Any) -> None:
        """Once before training: make the trainable parameters require grad."""

    def on_epoch_start(self, text_encoder: Any, unet: Any) -> None:
        """At the start of each epoch (puts the network in train mode)."""

    def get_trainable_params(self) -> Iterable[torch.nn.Parameter]:
        """What gradient clipping sees."""


@runtime_checkable
class NetworkModule(Protocol):
    """The Python module named by `--network_module`."""

    def create_network(self, multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                       text_encoder: Any, unet: Any, **kwargs: Any) -> Network:
        """A fresh network. `kwargs` are the `--network_args` strings (and `neuron_dropout`)."""

    def create_network_from_weights(self, multiplier: float, file: str | os.PathLike | None, vae: Any,
                                    text_encoder: Any, unet: Any, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                    for_inference: bool = False, **kwargs: Any) -> tuple[Network, Any]:
        """A network shaped like a file (its modules and ranks); returns (network, state dict). Loads nothing."""


REQUIRED_MODULE_FUNCTIONS: tuple[str, ...] = ("create_network", "create_network_from_weights")
REQUIRED_NETWORK_MEMBERS: tuple[str, ...] = ("apply_to", "prepare_optimizer_params", "save_weights", "load_weights",
                                             "enable_gradient_checkpointing", "prepare_grad_etc", "on_epoch_start",
                                             "get_trainable_params")


def import_network_module(name: str, needs: Iterable[str] = REQUIRED_MODULE_FUNCTIONS) -> ModuleType:
    """Import `--network_module NAME` and check that it has the functions this use needs (one clear error)."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        hint = " (pip install lycoris-lora, or the toolkit's [lycoris] extra)" if name.split(".")[0] == "lycoris" else ""
        raise UserError(f"--network_module {name}: cannot import it ({e}){hint}") from None
    missing = [f for f in needs if not callable(getattr(module, f, None))]
    if missing:
        raise UserError(f"--network_module {name} is not a kohya network module: it has no {', '.join(missing)}()")
    return module


def check_network(network: Any, module_name: str, needs: Iterable[str] = REQUIRED_NETWORK_MEMBERS) -> None:
    """Fail with the module's name when the network it made lacks a member we are about to rely on."""
    missing = [m for m in needs if not callable(getattr(network, m, None))]
    if missing:
        raise UserError(f"--network_module {module_name}: its network has no {', '.join(missing)}() "
                        "(see networks/protocol.py for the interface)")


def uses_native_models(module: ModuleType) -> bool:
    """Whether the module takes our diffusers models as they are (ours) or wants sd-scripts' view (all others)."""
    return bool(getattr(module, "NATIVE_MODELS", False))


def models_for(module: ModuleType, text_encoders: TextEncoders,
               denoiser: torch.nn.Module) -> tuple[TextEncoders, torch.nn.Module]:
    """(text encoders, denoiser) as this network module must see them (see the module docstring)."""
    if uses_native_models(module):
        return text_encoders, denoiser
    from networks.model_views import sd_scripts_text_encoders, sd_scripts_view

    return sd_scripts_text_encoders(text_encoders), sd_scripts_view(denoiser)


def optional(network: Any, name: str) -> Any:
    """The optional member `name` of `network`, or None (sd-scripts' `hasattr` checks)."""
    member = getattr(network, name, None)
    return member if callable(member) else None


__all__ = ["Network", "NetworkModule", "OPTIONAL_NETWORK_MEMBERS", "REQUIRED_MODULE_FUNCTIONS",
           "REQUIRED_NETWORK_MEMBERS", "TextEncoders", "check_network", "import_network_module", "models_for",
           "optional", "uses_native_models"]
