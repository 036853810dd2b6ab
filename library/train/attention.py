"""Which PyTorch SDPA kernels training may use.

cuDNN's fused attention backward (the kernel SDPA prefers on Hopper since PyTorch 2.11) returns NaN or wrong
gradients for some shapes: pytorch/pytorch#196678 (seq_len % 128 == 64 with a mask), NVIDIA/cudnn-frontend#160 and
#1072. On an H200 it turned every FLUX and CLIP LoRA gradient of the tiny test model non-finite from the first step,
while the forward and the flash, memory-efficient and math kernels were fine (bench/flux_lowvram_diag.py, recorded in
docs/benchmarks.md). Training therefore runs without it unless asked; generation only runs the forward and keeps it.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def configure_training_attention(allow_cudnn: bool) -> None:
    """Turn cuDNN SDPA off for this process (on CUDA, unless `allow_cudnn`)."""
    if not torch.cuda.is_available():
        return
    if allow_cudnn:
        logger.info("--sdpa_cudnn: cuDNN attention stays enabled in training")
        return
    torch.backends.cuda.enable_cudnn_sdp(False)
    logger.info("cuDNN attention disabled for training (its backward is unreliable; see library/train/attention.py); "
                "flash and memory-efficient SDPA are used")
