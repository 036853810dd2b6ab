"""What the training loop reads back from the device, and when: the per-step losses and the non-finite guard.

Reading a GPU tensor on the host (`.item()`, `.cpu()`, `bool(t)`) waits for every kernel queued before it: the host
stops queueing the next step while the GPU drains, and the GPU then idles while the host catches up. So the loop
keeps each step's loss on the device and reads the losses of several steps at once (`PendingLosses`): at most once
per `every_s` seconds (and at least every `max_steps` steps), and whenever something else is about to be logged
(sampling, validation, the end of the run), so that trackers see the steps in order. The values written to the
trackers, the loss log and the progress bar are the same numbers as before, only written a little later.

The guard against stepping on a NaN (`NonFiniteGuard`): a non-finite loss or gradient must never reach the weights.
Deciding that on the host needs a read per optimizer step. When the optimizer can skip a step on the device
(torch's fused Adam/AdamW/SGD/Adagrad read a `found_inf` tensor, as the fp16 grad scaler uses them), the guard hands
it the flag instead: the step is skipped on the device, the flag waits with the step's loss, and the run stops with
the same message at the next read. Optimizers whose state is all tensors (bitsandbytes' 8-bit ones, torch's without
`fused`) step anyway on CUDA and have the step undone on the device when the flag is set (step_restore.py); the run
stops at the next read in the same way. The rest (Prodigy, D-Adaptation, Adafactor, schedule-free) keep the per-step
read (one sync per step), as does the first step of any optimizer (its state does not exist before it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

# torch optimizers whose fused implementation skips the step when `found_inf` is 1 (the flag stays on the device)
FOUND_INF_OPTIMIZERS: tuple[type, ...] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


@dataclass
class StepRecord:
    step: int
    epoch: int
    loss: torch.Tensor  # 0-d, on the device, detached
    lr: float
    time: float
    nonfinite: torch.Tensor | None = None  # 0-d float flag (1: the optimizer step was skipped), deferred guard only


@dataclass
class PendingLosses:
    """Per-step losses kept on the device until the next read (one host sync for all of them)."""

    every_s: float = 1.0
    max_steps: int = 50
    records: list[StepRecord] = field(default_factory=list)
    _last_read: float = field(default_factory=lambda: time.monotonic())

    def add(self, record: StepRecord) -> None:
        self.records.append(record)

    def due(self) -> bool:
        return bool(self.records) and (len(self.records) >= self.max_steps
                                       or time.monotonic() - self._last_read >= self.every_s)

    def read(self) -> list[tuple[StepRecord, float, bool]]:
        """(record, loss value, whether its step was non-finite) for each pending step; one sync in all."""
        if not self.records:
            return []
        records, self.records = self.records, []
        self._last_read = time.monotonic()
        n = len(records)
        values = [r.loss.detach().float().reshape(()) for r in records]
        if any(r.nonfinite is not None for r in records):
            device = values[0].device
            values += [r.nonfinite.float().reshape(()).to(device) if r.nonfinite is not None
                       else torch.zeros((), device=device) for r in records]
        host = torch.stack(values).tolist()  # the one read-back
        bad = [v != 0.0 for v in host[n:]] if len(host) > n else [False] * n
        return list(zip(records, host[:n], bad))


def supports_device_skip(optimizer: Any) -> bool:
    """Whether `optimizer` (or the one accelerate wraps) skips a step on the device from a `found_inf` tensor."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return isinstance(inner, FOUND_INF_OPTIMIZERS) and bool(inner.defaults.get("fused"))


def nonfinite_flag(loss: torch.Tensor | None, grads: list[torch.Tensor]) -> torch.Tensor:
    """1.0 (as a 0-d float tensor on the device) when the loss or any gradient holds NaN or inf, else 0.0; no sync.

    The gradients are checked by torch's AMP kernel (`_amp_foreach_non_finite_check_and_unscale_`, what the fp16
    grad scaler uses) with a scale of 1, which leaves every finite value as it is: a few multi-tensor launches per
    device and dtype instead of two small kernels per gradient (an SDXL LoRA has over a thousand). Exactly 0 or 1,
    because torch's fused optimizers skip the step only when `found_inf == 1`."""
    if not grads and loss is None:
        return torch.zeros(())
    device = grads[0].device if grads else loss.device  # type: ignore[union-attr]
    found = torch.zeros(1, device=device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        if g.device != device or g.is_sparse:  # not one device (or sparse): one check per tensor
            found = torch.maximum(found, (~torch.isfinite(g).all()).float().to(device, non_blocking=True).reshape(1))
        else:
            by_dtype.setdefault(g.dtype, []).append(g)
    if by_dtype:
        one = torch.ones(1, device=device)
        for same_dtype in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, found, one)
    if loss is not None:
        loss_bad = (~torch.isfinite(loss.detach()).all()).float().to(device, non_blocking=True).reshape(1)
        found = torch.maximum(found, loss_bad)
    return found.reshape(())


class NonFiniteGuard:
    """Stops training before an optimizer step on a non-finite loss or gradient (see the module docstring)."""

    def __init__(self, optimizer: Any, scaler_active: bool, fused_backward: Any = None):
        """`fused_backward` (--fused_backward_pass, library/train/fused_backward.py): the parameters have stepped in
        the backward pass, which checked their gradients; this guard then only adds the loss to its flag."""
        from library.train.step_restore import StepRestore, supports_device_restore

        self._inner = getattr(optimizer, "optimizer", optimizer)
        self._fused_backward = fused_backward
        self._found_inf = fused_backward is None and not scaler_active and supports_device_skip(optimizer)
        self._restore = (StepRestore(self._inner) if fused_backward is None and not scaler_active
                         and not self._found_inf and supports_device_restore(optimizer) else None)
        self._armed: torch.Tensor | None = None

    @property
    def deferred(self) -> bool:
        """Whether this step's check stays on the device (the flag is read with the step's loss)."""
        if self._fused_backward is not None:
            return bool(self._fused_backward.device_skip)
        return self._found_inf or (self._restore is not None and self._restore.ready())

    def arm(self, loss: torch.Tensor | None, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Deferred mode, before the step: the flag of this step, handed to the optimizer so that it skips the step
        (fused optimizers), or kept to undo the step after it (the others: a snapshot is taken now)."""
        flag = nonfinite_flag(loss, [p.grad for p in params if p.grad is not None])
        if self._fused_backward is not None:
            in_backward = self._fused_backward.take_flag()
            return flag if in_backward is None else torch.maximum(flag, in_backward.to(flag.device).float())
        if self._found_inf:
            self._inner.found_inf = flag
        elif self._restore is not None:
            self._restore.snapshot()
            self._armed = flag
        return flag

    def disarm(self) -> None:
        """After the step: undo it where the flag is set, or remove the flag `arm` handed over (the fp16 grad scaler
        sets and removes its own `found_inf`)."""
        if self._armed is not None:
            assert self._restore is not None
            self._restore.restore(self._armed)
            self._armed = None
        elif self._found_inf and hasattr(self._inner, "found_inf"):
            del self._inner.found_inf


def loss_is_finite(loss: torch.Tensor) -> bool:
    """The immediate check (one sync): used where the optimizer cannot skip a step on the device."""
    return bool(torch.isfinite(loss.detach()).all())

