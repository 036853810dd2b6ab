"""--base_weights / --base_weights_multiplier: network files merged into the frozen base model before the new network
is created (sd-scripts' train_network.py), so that the run trains on top of base + sum_i m_i * update_i.

The files are read by the run's own --network_module (as sd-scripts does: `create_network_from_weights(m, file, ...,
for_inference=True)` then `merge_to`), so a LyCORIS run merges LyCORIS files. The merge runs right after the models
are loaded, in their load precision and before any cast to the training dtype or to fp8 (a layer stored in fp8
cannot take a merge, see library/models/lowvram.py), so the result is the same as training from a checkpoint that
tools/merge_lora.py merged.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from library.config.network_flags import NetworkConfig
from library.errors import UserError
from networks import protocol

logger = logging.getLogger(__name__)


def base_weight_multipliers(files: Sequence[str], multipliers: Sequence[float] | None) -> list[float]:
    """sd-scripts' pairing: the i-th file gets the i-th multiplier, 1.0 when there is none; extra multipliers are
    not used (said once, since a shifted list is usually a mistake)."""
    given = list(multipliers or [])
    if len(given) > len(files):
        logger.warning("--base_weights_multiplier: %d values for %d --base_weights files; the last %d are not used",
                       len(given), len(files), len(given) - len(files))
    return [given[i] if i < len(given) else 1.0 for i in range(len(files))]


@torch.no_grad()
def merge_base_weights(ncfg: NetworkConfig, text_encoders: Sequence[torch.nn.Module], denoiser: torch.nn.Module,
                       vae: torch.nn.Module | None = None) -> int:
    """Merge every --base_weights file into the models in place; returns the number of modules merged in all."""
    files = list(ncfg.base_weights or [])
    if not files:
        return 0
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"--base_weights: no such file: {', '.join(missing)}")
    if not ncfg.network_module:
        raise UserError("--base_weights needs --network_module (the module that reads and merges the files)")
    module = protocol.import_network_module(ncfg.network_module)
    tes, den = protocol.models_for(module, list(text_encoders), denoiser)
    dtype = next(denoiser.parameters()).dtype
    merged = 0
    for file, multiplier in zip(files, base_weight_multipliers(files, ncfg.base_weights_multiplier)):
        network, weights_sd = module.create_network_from_weights(multiplier, file, vae, tes, den, for_inference=True)
        merge = protocol.optional(network, "merge_to")
        if merge is None:
            raise UserError(f"--base_weights: the networks of --network_module {ncfg.network_module} cannot be merged "
                            "into the model (they have no merge_to)")
        count = merge(tes, den, weights_sd, dtype, "cpu")
        merged += count if isinstance(count, int) else 0
        print(f"--base_weights: merged {file} into the base model with multiplier {multiplier}")
    return merged


__all__ = ["base_weight_multipliers", "merge_base_weights"]
