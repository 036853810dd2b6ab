"""The training session: everything built once before the loop starts, as one typed object.

Its own module (not loop.py) so that the modules the loop calls (batch inputs, validation, sampling, evaluation,
checkpoints) can name the type without importing the loop that imports them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from library.config.train_config import RunConfig
from library.families.interface import FamilyModels, ModelFamily

if TYPE_CHECKING:
    from accelerate import Accelerator

    from library.cache.text_outputs import TextOutputCache
    from library.data.dataset import TrainDataset
    from library.train.fused_backward import FusedBackward
    from library.train.network_adapter import TrainNetwork


@dataclass
class TrainResult:
    output_file: str
    global_step: int
    losses: list[float] = field(default_factory=list)


@dataclass
class Session:
    """Everything built once before the loop starts."""

    cfg: RunConfig
    family: ModelFamily
    accelerator: Accelerator
    models: FamilyModels
    network: TrainNetwork
    datasets: list[TrainDataset]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    text_cache: TextOutputCache | None
    weight_dtype: torch.dtype
    total_steps: int
    batches_per_epoch: int
    sharded: bool = False  # the base model is FSDP-sharded: every process takes part in each forward
    fused_backward: FusedBackward | None = None  # --fused_backward_pass: the optimizer steps inside the backward
