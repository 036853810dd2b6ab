"""Small numeric pieces of the loop: per-position generators, the masked loss, the gradient all-reduce and check."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def step_generator(seed: int, global_step: int, micro: int, position: int = 0) -> torch.Generator:
    """Noise and timesteps depend only on (seed, step, micro-batch, position in the global batch): resume replays
    them exactly, and N processes draw what one process with the whole global batch would."""
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + global_step * 1009 + micro * 101 + position * 7919) % (2 ** 63))


def all_reduce_mean_(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over processes in one flat buffer. The network is not wrapped in DDP: its modules live
    inside the frozen base model, so DDP's forward-driven reducer would never fire."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def nonfinite_grads(named_params: list[tuple[str, torch.nn.Parameter]], limit: int = 3) -> list[str]:
    """Names of (up to `limit`) parameters whose gradient holds NaN or inf; empty when all are finite. One device
    sync per call: the per-tensor flags are stacked before anything is read back."""
    with_grad = [(n, p.grad) for n, p in named_params if p.grad is not None]
    if not with_grad:
        return []
    finite = torch.stack([torch.isfinite(g).all() for _, g in with_grad]).cpu()
    return [n for (n, _), ok in zip(with_grad, finite.tolist()) if not ok][:limit]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
               weights: torch.Tensor | None) -> torch.Tensor:
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:  # alpha mask in pixel space -> latent resolution
        m = F.interpolate(mask.unsqueeze(1).float(), size=loss.shape[-2:], mode="area").to(loss.device)
        loss = loss * m
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if weights is not None:
        loss = loss * weights.to(loss.device)
    return loss.mean()
