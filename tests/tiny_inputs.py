"""Inputs for the tiny models' forward passes, shared by the tests that call a denoiser directly."""
from __future__ import annotations

from typing import Sequence

import torch


def flux_transformer_inputs(tr: torch.nn.Module, seed: int = 0, batch: int = 1, tokens: int = 16, txt: int = 8,
                            timesteps: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Seeded keyword arguments for a diffusers FluxTransformer2DModel call (timestep 0.5 unless given)."""
    g = torch.Generator().manual_seed(seed)
    cfg = tr.config
    t = torch.tensor(list(timesteps)) if timesteps is not None else torch.full((batch,), 0.5)
    return dict(hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=t, img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(txt, 3),
                guidance=torch.full((batch,), 3.5))
