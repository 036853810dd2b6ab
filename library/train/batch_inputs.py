"""A batch's denoiser inputs, shared by the training step and the validation loss: text-encoder outputs (from the
cache or encoded now) and latents (from the cache or encoded now, with per-sample posterior draws)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from library.train.session import Session


def batch_text(session: Session, batch: Any, grad: bool) -> dict[str, torch.Tensor]:
    s = session
    if s.text_cache is not None:
        outs = [s.text_cache.get(c) for c in batch.captions]
        return {k: torch.stack([o[k] for o in outs]).to(s.accelerator.device) for k in outs[0]}
    with torch.set_grad_enabled(grad), s.accelerator.autocast():
        return s.family.encode_text(s.models, batch.captions)


def batch_latents(session: Session, batch: Any, gens: list[torch.Generator]) -> torch.Tensor:
    s = session
    if batch.latents is not None:
        return batch.latents.to(s.accelerator.device, s.weight_dtype)
    with torch.no_grad():
        return s.family.encode_images(s.models, batch.images.to(s.accelerator.device), gens).to(s.weight_dtype)
