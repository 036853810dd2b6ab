"""SDXL --fp8_base / --fp8_base_unet: the frozen U-Net's (and text encoders') weights stored in float8_e4m3fn and
upcast to the mixed-precision dtype one layer at a time (the machinery is library/models/lowvram.py's, as for FLUX).

Which layers, following sd-scripts (which casts the whole U-Net, and with --fp8_base the text encoders but their
embeddings): every Linear and Conv2d inside the U-Net's down, mid and up blocks (nearly all of its weights). The
input and output convolutions and the time / size embeddings stay in the compute dtype: they hold a fraction of a
percent of the weights, and the U-Net's first parameter keeps the compute dtype, which is what diffusers reports as
`unet.dtype` (the pipelines make their latents in it). --fp8_base also stores the Linears of the text encoders'
transformer layers (not the embeddings, not CLIP-G's projection); --fp8_base_unet leaves the text encoders as
they are.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from library.models.lowvram import apply_fp8_linear

logger = logging.getLogger(__name__)

SDXL_UNET_FP8_INCLUDE: tuple[str, ...] = (r"^down_blocks\.", r"^mid_block\.", r"^up_blocks\.")
CLIP_FP8_INCLUDE: tuple[str, ...] = (r"(^|\.)encoder\.layers\.\d+\.",)


def apply_sdxl_fp8(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], fp8_base: bool,
                   fp8_base_unet: bool, device: torch.device | None = None) -> int:
    """Put the frozen weights in fp8 as the flags ask; returns the number of layers stored in fp8. Call once the
    models have their device and compute dtype, before any network is attached."""
    if not (fp8_base or fp8_base_unet):
        return 0
    dtype = next(unet.parameters()).dtype
    n = apply_fp8_linear(unet, dtype, SDXL_UNET_FP8_INCLUDE, work_device=device, convs=True)
    logger.info("--fp8_base: %d U-Net Linear / Conv2d layers stored in float8_e4m3fn, computed in %s", n, dtype)
    if fp8_base_unet:
        return n
    for te in text_encoders:
        te_dtype = next(te.parameters()).dtype
        n += apply_fp8_linear(te, te_dtype, CLIP_FP8_INCLUDE, work_device=device)
    return n


__all__ = ["CLIP_FP8_INCLUDE", "SDXL_UNET_FP8_INCLUDE", "apply_sdxl_fp8"]
