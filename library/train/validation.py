"""Validation loss on the held-out split (`validation_split` in the dataset config).

Noise, timesteps and the VAE posterior sample are fixed per held-out item, so the number is comparable across steps
and across runs with the same seed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from library.train.batch_inputs import batch_latents, batch_text
from library.train.loop_math import step_generator
from library.train.loss_step import compute_loss

if TYPE_CHECKING:
    from library.train.session import Session

VALIDATION_STEP = -1  # a loop position no training step uses: its generators are the validation ones


@torch.no_grad()
def validation_loss(session: Session) -> float | None:
    s = session
    total, count = 0.0, 0
    net = s.network.module
    was_training = net.training
    net.eval()
    limit = getattr(getattr(s.cfg, "validation", None), "max_validation_steps", None)
    batches = [(ds, indices) for ds in s.datasets for indices in ds.validation_batches()]
    if limit is not None and limit >= 0:
        batches = batches[:limit]  # sd-scripts' --max_validation_steps: the first N held-out batches
    try:
        for ds, indices in batches:
            batch = ds.load_batch(indices, 0, augment=False)
            gens = [step_generator(s.cfg.training.seed, VALIDATION_STEP, 0, i) for i in indices]
            latents = batch_latents(s, batch, gens)
            text = batch_text(s, batch, grad=False)
            # the training loss function (--loss_type, --masked_loss), unweighted
            loss = compute_loss(s.family, s.models, s.cfg.training, batch, latents, text, generators=gens,
                                before_forward=s.network.before_forward, autocast=s.accelerator.autocast,
                                weighted=False)
            total += loss.item() * len(indices)
            count += len(indices)
    finally:
        net.train(was_training)
    return total / count if count else None
