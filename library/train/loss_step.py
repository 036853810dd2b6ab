"""The loss of one batch: noise -> predict -> target -> weights -> loss, written once for the training step
(Trainer._loss), the validation loss (library/train/validation.py) and the step benchmark (bench/bench_lora_step.py),
so that the three cannot drift apart.

It takes the latents and text-encoder outputs already made (the callers get them from caches, encoders or fixed
random tensors) and the family's models as they are; nothing here knows about sessions or accelerators.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Callable

import torch

from library.train.loop_math import loss_mask, training_loss

if TYPE_CHECKING:
    from library.config.training_flags import TrainingConfig
    from library.data.dataset import Batch
    from library.families.interface import FamilyModels, ModelFamily, NoisyInput, TextOutputs


def compute_loss(family: ModelFamily, models: FamilyModels, training: TrainingConfig, batch: Batch,
                 latents: torch.Tensor, text: TextOutputs, *, generators: list[torch.Generator] | None = None,
                 inp: NoisyInput | None = None, seed: int | None = None,
                 before_forward: Callable[[Batch], None] | None = None,
                 autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
                 weighted: bool = True) -> torch.Tensor:
    """The scalar loss of one batch with the training loss function (--loss_type, --masked_loss).

    `inp` given: its noise and timesteps are used (the benchmark's fixed draws); else the family draws them from
    `generators`. `seed` reseeds torch's global RNG just before the forward (the training step does, so dropout and
    other global draws repeat on resume). `weighted=False` leaves out the per-sample weights (min-SNR and friends,
    the dataset's loss weights): the validation loss is the plain loss, comparable across weighting flags.
    """
    if inp is None:
        if generators is None:
            raise ValueError("compute_loss needs the generators to draw noise and timesteps, or a NoisyInput")
        inp = family.noise_and_timesteps(latents, generators, training)
    if seed is not None:
        torch.manual_seed(seed)
    if before_forward is not None:
        before_forward(batch)
    with autocast():
        pred = family.predict(models, inp, text, batch)
    target = family.loss_target(models, latents, inp)
    weights = family.loss_weights(models, inp, training) if weighted else None
    return training_loss(pred, target, loss_type=training.loss_type, threshold=family.huber_threshold(inp, training),
                         mask=loss_mask(batch, training.masked_loss), weights=weights,
                         sample_weights=getattr(batch, "loss_weights", None) if weighted else None)
