"""Attaching a network file to loaded models for generation, through the kohya interface only (networks/protocol.py).

Generation (`sdxl_gen_img.py`, `flux_gen_img.py`) calls `attach_network_file` once per `--network_weights` file:
the module named by `--network_module` shapes a network after the file (`create_network_from_weights`), which is then
hooked into the models (`apply_to` + `load_weights`) or merged into their weights (`merge_to`), as sd-scripts'
generation scripts do. Modules other than ours see the models as sd-scripts shows them (networks/model_views.py), so
a LyCORIS file written under sd-scripts finds its layers here.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from library.errors import UserError
from networks import protocol
from networks.model_views import materialized_fused_weights

logger = logging.getLogger(__name__)

TEXT_ENCODER_PREFIX = "lora_te"
DENOISER_PREFIX = "lora_unet"


def attach_network_file(module_name: str, file: str | os.PathLike, multiplier: float, vae: torch.nn.Module | None,
                        text_encoders: Sequence[torch.nn.Module], denoiser: torch.nn.Module, merge: bool,
                        device: torch.device, dtype: torch.dtype,
                        net_kwargs: dict[str, str] | None = None) -> protocol.Network | None:
    """Hook the network in `file` into the models (returned, for `set_multiplier`), or merge it (returns None).

    A network that says it is not mergeable (`is_mergeable()` false) is hooked in even with `merge`, as sd-scripts
    does."""
    module = protocol.import_network_module(module_name, ("create_network_from_weights",))
    tes, model = protocol.models_for(module, text_encoders, denoiser)
    network, weights = module.create_network_from_weights(multiplier, os.fspath(file), vae, tes, model,
                                                          for_inference=True, **(net_kwargs or {}))
    if network is None:
        raise UserError(f"--network_module {module_name}: create_network_from_weights returned no network "
                                 f"for {os.fspath(file)}")
    is_mergeable = protocol.optional(network, "is_mergeable")
    if merge and protocol.optional(network, "merge_to") is not None and (is_mergeable is None or is_mergeable()):
        with materialized_fused_weights(model if model is not denoiser else None):
            merged = network.merge_to(tes, model, weights, dtype, device)
        logger.info("%s: merged%s at multiplier %g", os.fspath(file),
                    f" {merged} modules" if isinstance(merged, int) else "", multiplier)
        return None
    if merge:
        logger.warning("%s: %s cannot merge it; it is applied instead", os.fspath(file), module_name)
    protocol.check_network(network, module_name, ("apply_to", "load_weights"))
    keys = list(weights.keys()) if weights is not None else []
    has_te = any(k.startswith(TEXT_ENCODER_PREFIX) for k in keys) or not keys
    has_unet = any(k.startswith(DENOISER_PREFIX) for k in keys) or not keys
    network.apply_to(tes, model, has_te, has_unet)
    info = network.load_weights(os.fspath(file))
    logger.info("%s: %s", os.fspath(file), info)
    network.to(device, dtype).eval()
    return network


__all__ = ["attach_network_file"]
