"""Validation loss on the held-out split (`validation_split` in the dataset config).

Noise, timesteps and the VAE posterior sample are fixed per held-out item, so the number is comparable across steps
and across runs with the same seed.
"""
from __future__ import annotations

from typing import Any

import torch

from library.train.batch_inputs import batch_latents, batch_text
from library.train.loop_math import loss_mask, step_generator, training_loss

VALIDATION_STEP = -1  # a loop position no training step uses: its generators are the validation ones


@torch.no_grad()
def validation_loss(session: Any) -> float | None:
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
            inp = s.family.noise_and_timesteps(latents, gens, s.cfg.training)
            s.network.before_forward(batch)
            with s.accelerator.autocast():
                pred = s.family.predict(s.models, inp, text, batch)
            target = s.family.loss_target(s.models, latents, inp)
            t = s.cfg.training  # the training loss function (--loss_type, --masked_loss), unweighted
            threshold_of = getattr(s.family, "huber_threshold", None)
            loss = training_loss(pred, target, loss_type=t.loss_type,
                                 threshold=threshold_of(inp, t) if threshold_of else None,
                                 mask=loss_mask(batch, t.masked_loss))
            total += loss.item() * len(indices)
            count += len(indices)
    finally:
        net.train(was_training)
    return total / count if count else None
