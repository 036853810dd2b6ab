"""Flags of the training run itself: steps, precision, noise and timesteps, attention."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from library.config.flags import flag


@dataclass
class TrainingConfig:
    """training"""

    # Where the datasets come from (a library.config.dataset_source.DatasetSource: a dataset TOML or the dataset
    # flags); built from the dataset flags, so not a flag itself. str() names it for messages.
    dataset_config: Any = None
    seed: int = flag(None, "random seed (unset: 42, so that runs repeat; sd-scripts picks a random one)", unset=42)
    max_train_steps: int = flag(1600, "training steps (optimizer updates)")
    max_train_epochs: int | None = flag(None, "training epochs (overrides --max_train_steps)")
    gradient_accumulation_steps: int = flag(1, "batches per optimizer update")
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward pass (less memory, slower)")
    mixed_precision: str = flag("no", "compute dtype of the frozen model and autocast", choices=["no", "fp16", "bf16"],
                                type=str)
    full_bf16: bool = flag(False, "keep the trainable weights and gradients in bf16 (needs --mixed_precision bf16)")
    full_fp16: bool = flag(False, "keep the trainable weights and gradients in fp16 (needs --mixed_precision fp16)")
    noise_offset: float | None = flag(None, "noise offset (e.g. 0.1): brighter brights and darker darks")
    min_snr_gamma: float | None = flag(None, "min-SNR loss weighting gamma (5 is the paper's value)")
    min_timestep: int = flag(None, "lowest timestep sampled in training (unset: 0)", unset=0)
    max_timestep: int = flag(None, "timestep bound sampled in training, exclusive (unset: 1000)", unset=1000)
    sdpa: bool = flag(False, "use PyTorch SDPA attention (the default)")
    xformers: bool = flag(False, "use xformers attention (optional extra; without it: a warning, then SDPA)")
    mem_eff_attn: bool = flag(False, "memory-efficient attention: PyTorch SDPA is used, which is memory-efficient "
                                     "already (a warning says so)")
    sdpa_cudnn: bool = flag(False, "let training use cuDNN's SDPA kernel (off by default: its backward gave NaN "
                                   "gradients on Hopper GPUs, see library/train/attention.py)")
