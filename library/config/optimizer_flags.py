"""Flags of the optimizer and the learning-rate schedule."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import flag, int_or_float


@dataclass
class OptimizerConfig:
    """optimizer and schedule"""

    optimizer_type: str = flag("", "AdamW, AdamW8bit, Lion, Lion8bit, Prodigy, Adafactor, SGDNesterov, ... or "
                                   "module.ClassName; empty means AdamW", unset="AdamW")
    optimizer_args: list[str] = flag(None, "optimizer keyword arguments as key=value pairs, e.g. weight_decay=0.01",
                                     unset=[])
    learning_rate: float = flag(2e-6, "learning rate (the default for the U-Net and text encoders)")
    lr_scheduler: str = flag("constant", "learning-rate schedule: constant, linear, cosine, cosine_with_restarts, "
                                         "polynomial, constant_with_warmup, ...")
    lr_warmup_steps: int | float = flag(0, "warm-up steps, or a fraction (< 1) of the training steps",
                                        type=int_or_float)
    lr_scheduler_num_cycles: int = flag(1, "restarts of cosine_with_restarts")
    lr_scheduler_power: float = flag(1, "power of the polynomial schedule")
    max_grad_norm: float = flag(1.0, "clip gradients to this norm (0: no clipping)")
