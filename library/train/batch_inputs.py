"""A batch's denoiser inputs, shared by the training step and the validation loss: text-encoder outputs (from the
cache or encoded now) and latents (from the cache or encoded now, with per-sample posterior draws)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from library.device_copy import to_device

if TYPE_CHECKING:
    from library.train.session import Session


def batch_text(session: Session, batch: Any, grad: bool) -> dict[str, torch.Tensor]:
    s = session
    if s.text_cache is not None:
        outs = [s.text_cache.get(c) for c in batch.captions]
        pin = torch.cuda.is_available()  # a pinned copy goes to the GPU without blocking the host
        text = {k: to_device(_stacked([o[k] for o in outs], pin), s.accelerator.device) for k in outs[0]}
        if s.text_cache.live_encoders:  # a partial cache: the trained encoders run now, with gradients
            with torch.set_grad_enabled(grad), s.accelerator.autocast():
                text.update(s.family.encode_text_part(s.models, batch.captions, s.text_cache.live_encoders))
        return text
    with torch.set_grad_enabled(grad), s.accelerator.autocast():
        return s.family.encode_text(s.models, batch.captions)


def batch_latents(session: Session, batch: Any, gens: list[torch.Generator]) -> torch.Tensor:
    s = session
    if batch.latents is not None:
        return to_device(batch.latents, s.accelerator.device, s.weight_dtype)  # pinned by the prefetcher
    with torch.no_grad():
        return s.family.encode_images(s.models, to_device(batch.images, s.accelerator.device), gens).to(s.weight_dtype)


def _stacked(tensors: list[torch.Tensor], pin: bool) -> torch.Tensor:
    out = torch.stack(tensors)
    return out.pin_memory() if pin and out.device.type == "cpu" else out
