"""Flags of the optimizer and the learning-rate schedule."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import flag, int_or_float


@dataclass
class OptimizerConfig:
    """optimizer and schedule"""

    optimizer_type: str = flag("", "AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit, "
                                   "PagedLion8bit, SGDNesterov, SGDNesterov8bit, DAdaptation, DAdaptAdam, "
                                   "DAdaptAdaGrad, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, "
                                   "Adafactor, AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree, a torch.optim "
                                   "class name or module.ClassName; empty means AdamW", unset="AdamW")
    optimizer_args: list[str] = flag(None, "optimizer keyword arguments as key=value pairs, e.g. weight_decay=0.01",
                                     unset=[])
    use_8bit_adam: bool = flag(False, "old spelling of --optimizer_type AdamW8bit")
    use_lion_optimizer: bool = flag(False, "old spelling of --optimizer_type Lion")
    learning_rate: float = flag(2e-6, "learning rate (the default for the U-Net and text encoders)")
    lr_scheduler: str = flag("constant", "learning-rate schedule: constant, constant_with_warmup, linear, cosine, "
                                         "cosine_with_restarts, polynomial, inverse_sqrt, cosine_with_min_lr, "
                                         "warmup_stable_decay, piecewise_constant, adafactor")
    lr_warmup_steps: int | float = flag(0, "warm-up steps, or a fraction (< 1) of the training steps",
                                        type=int_or_float)
    lr_decay_steps: int | float = flag(0, "decay steps of warmup_stable_decay, or a fraction (< 1) of the training "
                                          "steps", type=int_or_float)
    lr_scheduler_num_cycles: int = flag(1, "restarts of cosine_with_restarts (also the cycles of cosine_with_min_lr "
                                           "and warmup_stable_decay)")
    lr_scheduler_power: float = flag(1, "power of the polynomial schedule")
    lr_scheduler_timescale: int | None = flag(None, "time scale of inverse_sqrt (default: the warm-up steps, or 10000)")
    lr_scheduler_min_lr_ratio: float | None = flag(None, "the lowest learning rate as a fraction of the initial one "
                                                         "(cosine_with_min_lr, warmup_stable_decay)")
    lr_scheduler_type: str = flag("", "a scheduler class instead of --lr_scheduler: a torch.optim.lr_scheduler name or "
                                      "module.ClassName, built with --lr_scheduler_args")
    lr_scheduler_args: list[str] = flag(None, "scheduler keyword arguments as key=value pairs (Python literals), "
                                              "e.g. T_max=100", unset=[])
    max_grad_norm: float = flag(1.0, "clip gradients to this norm (0: no clipping)")
    fused_backward_pass: bool = flag(False, "step each parameter as soon as its gradient is complete during the "
                                            "backward pass and free that gradient (less memory); per-parameter "
                                            "optimizers only (AdamW, Adam, SGD, Adafactor, Lion, ...), with "
                                            "--gradient_accumulation_steps 1; --max_grad_norm then clips each "
                                            "parameter's gradient on its own, as sd-scripts does")
