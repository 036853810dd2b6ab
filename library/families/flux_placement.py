"""Where a FLUX transformer's weights live: --fp8_base (fp8 storage, upcast per layer) and --blocks_to_swap (blocks
kept in host memory, each copied to the GPU ahead of when it runs), for training and generation alike: the
generator's transformer calls go through the same hooks as the trainer's.

The generic machinery (Fp8Linear, BlockSwapper, place_module) is in library/models/lowvram.py; this module holds the
FLUX policy on top of it: which flags are valid where, and the order fp8 -> swap on a placed transformer.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch

from library.config.flux_config import FluxConfig
from library.errors import UserError
from library.models.lowvram import DEFAULT_SWAP_PREFETCH, BlockSwapper, apply_fp8_linear, place_module, swapped_blocks

logger = logging.getLogger(__name__)


def check_low_vram_flags(blocks_to_swap: int | None, task: Literal["train", "generate"],
                         device: torch.device | None = None) -> None:
    """--blocks_to_swap moves blocks between the CPU and a CUDA GPU: refuse it up front where there is none (or where
    --device names another kind). --fp8_base works anywhere: fp8 storage with an upcast per layer is plain torch."""
    if blocks_to_swap is not None and blocks_to_swap < 0:
        raise UserError(f"--blocks_to_swap must be a positive number of blocks, got {blocks_to_swap}")
    if not blocks_to_swap:
        return
    if not torch.cuda.is_available():
        raise UserError("--blocks_to_swap needs a CUDA GPU (it keeps blocks on the CPU and moves each to the GPU "
                        f"while it runs), and none is available: drop the flag to {task} on the CPU")
    if device is not None and device.type != "cuda":
        raise UserError(f"--blocks_to_swap swaps blocks between the CPU and a CUDA GPU, but --device is {device}")


def place_transformer(transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                      blocks_to_swap: int | None) -> None:
    """Cast on the CPU, then move; blocks that --blocks_to_swap keeps on the CPU never visit the device."""
    current = next(transformer.parameters())
    if not blocks_to_swap:
        if current.device != device or current.dtype != dtype:
            transformer.to(device=device, dtype=dtype)
        return
    place_module(transformer, device, dtype if current.dtype != dtype else None,
                 swapped_blocks(transformer, blocks_to_swap))


def apply_low_vram(transformer: torch.nn.Module, fcfg: FluxConfig, device: torch.device,
                   gradient_checkpointing: bool | None = None) -> BlockSwapper | None:
    """--fp8_base, then --blocks_to_swap, on a transformer that already has its device and compute dtype; returns
    the BlockSwapper (or None). `gradient_checkpointing` is None for inference and a bool in training, where
    swapping needs it (the backward re-runs each swapped block's forward, which brings the block back)."""
    if fcfg.fp8_base:
        dtype = next(transformer.parameters()).dtype
        n = apply_fp8_linear(transformer, dtype, work_device=device)
        logger.info("--fp8_base: %d transformer Linears stored in float8_e4m3fn, computed in %s", n, dtype)
    if not fcfg.blocks_to_swap:
        return None
    if gradient_checkpointing is False:
        raise UserError("--blocks_to_swap in training needs --gradient_checkpointing: the backward pass re-runs each "
                        "swapped block's forward to bring it back to the GPU")
    prefetch = getattr(fcfg, "swap_prefetch", None)  # FluxConfig has it; bare test configs may not
    if prefetch is not None and prefetch < 0:
        raise UserError(f"--swap_prefetch must be 0 or more blocks, got {prefetch}")
    swapper = BlockSwapper.attach(transformer, fcfg.blocks_to_swap, device,
                                  prefetch=DEFAULT_SWAP_PREFETCH if prefetch is None else prefetch)
    logger.info("--blocks_to_swap: %d of %d blocks kept in %s host memory, %d copied ahead of the running one "
                "(%d device slots of %.0f MiB)", len(swapper.blocks),
                len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks),
                "pinned" if swapper.device.type == "cuda" else "CPU", swapper.prefetch, swapper.plan.n_slots,
                swapper.slot_bytes / 2**20)
    return swapper
