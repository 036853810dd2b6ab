"""Small numeric pieces of the loop: per-position generators, the masked loss, the gradient all-reduce and check."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from library.device_copy import to_device
from library.families.noise import HUBER_SCHEDULES, huber_threshold  # noqa: F401 (re-exported)


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


def mask_at_latent_size(mask: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """A pixel-space mask [B,H,W] averaged down to the element-wise loss's latent grid [B,1,h,w], on its device:
    area averaging keeps a soft edge as the fraction of each latent cell the mask covers."""
    return F.interpolate(to_device(mask, loss.device).unsqueeze(1).float(), size=loss.shape[-2:], mode="area")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
               weights: torch.Tensor | None) -> torch.Tensor:
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        loss = loss * mask_at_latent_size(mask, loss)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if weights is not None:
        loss = loss * to_device(weights, loss.device)
    return loss.mean()


LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     threshold: torch.Tensor | None = None) -> torch.Tensor:
    """sd-scripts' `--loss_type`, element by element (no reduction). huber and smooth_l1 are the pseudo-Huber forms
    with a per-sample threshold c (see huber_threshold): huber = 2c(sqrt(d^2 + c^2) - c), smooth_l1 = 2(sqrt(d^2 + c^2)
    - c), so huber is about d^2 for small errors and 2c|d| for large ones."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if threshold is None:
            raise ValueError(f"--loss_type {loss_type} needs a threshold (huber_threshold)")
        c = to_device(threshold, pred.device).float().view(-1, *([1] * (pred.ndim - 1)))
        core = torch.sqrt((pred - target) ** 2 + c ** 2) - c
        return 2 * c * core if loss_type == "huber" else 2 * core
    raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}")


def loss_mask(batch: Any, masked_loss: bool) -> torch.Tensor | None:
    """The pixel-space loss mask [B,H,W] in [0, 1], as sd-scripts picks it: with --masked_loss, the red channel of
    the conditioning image when the batch has one, else the alpha mask; without it, the alpha mask when the dataset
    loads one (alpha_mask = true), else none."""
    cond = getattr(batch, "conditioning_images", None)
    if masked_loss and cond is not None:
        return cond[:, 0].float()  # our conditioning images are in [0, 1] already
    return getattr(batch, "alpha_masks", None)


def training_loss(pred: torch.Tensor, target: torch.Tensor, *, loss_type: str = "l2",
                  threshold: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar training loss in sd-scripts' order: element-wise loss (--loss_type), the pixel mask brought to
    latent size, the mean per sample, the dataset's per-sample loss weights (--prior_loss_weight for regularization
    images), the family's per-sample weights (min-SNR and friends), the batch mean. With l2 and no mask and weights
    this is `masked_mse` exactly, operation for operation."""
    loss = elementwise_loss(pred, target, loss_type, threshold)
    if mask is not None:
        loss = loss * mask_at_latent_size(mask, loss)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if sample_weights is not None:
        loss = loss * to_device(sample_weights, loss.device, loss.dtype)
    if weights is not None:
        loss = loss * to_device(weights, loss.device)
    return loss.mean()
