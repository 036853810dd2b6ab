"""FLUX latents as tokens: 2x2 latent patches packed into a sequence, and the rotary position ids of those tokens.

Training (the loss on packed predictions), generation (starting noise, decoding) and Kontext pairs (control tokens
after the target's, with their own first id index) all pack the same way, so the layout lives in one place.
"""
from __future__ import annotations

import torch

from library.errors import UserError

KONTEXT_CONTROL_INDEX = 1.0  # FLUX.1 Kontext's first position-id index for the control image's tokens


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C * 4]: FLUX sees 2x2 latent patches as tokens."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise UserError(f"FLUX needs even latent sizes (images a multiple of 16 px); got latents {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent size (height, width)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype, index: float = 0.0) -> torch.Tensor:
    """[h/2 * w/2, 3] rotary position ids (index, row, column) of packed latent tokens."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)
