"""Undoing a non-finite optimizer step on the device, for optimizers that cannot skip one themselves (issue #18).

torch's fused Adam/AdamW/SGD/Adagrad read a `found_inf` flag and skip the step on the device (readback.py). The
others have no such input: bitsandbytes' 8-bit optimizers above all (AdamW8bit is the kohya GUI's default), and
torch's optimizers without `fused`. For them the guard had to read the flag on the host before every step, one
host-GPU synchronisation per step.

`StepRestore` lets them step anyway and undoes the step on the device when the flag is set:
- before the step, the trainable parameters and the optimizer's state tensors are copied into snapshot buffers
  (multi-tensor copies, queued without waiting);
- after it, each of them takes `where(flag, snapshot, value)`.

On a finite step every value is the step's own, bit for bit. On a non-finite one the parameters and the state are
those before it, and the run stops at the next loss read with the same message as the fused path.

What it costs: one more copy of the trainable parameters and of the optimizer state in memory (for a LoRA or an
LLLite, small beside the frozen model), and two passes over them per step. What it cannot undo: a counter that the
optimizer keeps on the host (bitsandbytes' `step`, torch's `step` when it lives on the CPU) counts the skipped step,
so the bias correction of the few steps before the stop is one step ahead.

Only optimizers whose whole state is tensors plus such counters are restored (a value computed on the host from the
gradients, as Prodigy's or D-Adaptation's step size, could not be). And only on CUDA: there a host read drains the
GPU's queue, while on the CPU it costs nothing and the snapshot would.

The step that creates the optimizer's state (the first) has nothing to snapshot, so it is checked on the host as
before; `ready()` says when the state exists.
"""
from __future__ import annotations

from typing import Any

import torch

# torch optimizers whose per-parameter state holds only tensors (moments, step counters), so a snapshot restores it
RESTORABLE_TORCH_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop,
    torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)
RESTORE_DEVICES: tuple[str, ...] = ("cuda",)  # where the per-step host read it replaces makes the host wait


def _trainable(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def _restorable_type(optimizer: Any) -> bool:
    # bitsandbytes' optimizers (Optimizer1State/Optimizer2State: 8-bit and 32-bit) keep their moments, quantisation
    # maps and scales as tensors and only `step` as an int. Not the paged ones: their state lives in memory the GPU
    # pages out, and a snapshot on the GPU would take back the memory paging saves.
    if type(optimizer).__module__.split(".")[0] == "bitsandbytes":
        return not getattr(optimizer, "is_paged", False)
    return isinstance(optimizer, RESTORABLE_TORCH_OPTIMIZERS)


def supports_device_restore(optimizer: Any) -> bool:
    """Whether a non-finite step of `optimizer` (or the one accelerate wraps) is undone on the device rather than
    checked on the host before the step. Plain tensors only: sharded ones (FSDP's DTensors) keep the host check."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = _trainable(inner)
    return (bool(params) and all(p.device.type in RESTORE_DEVICES and type(p.data) is torch.Tensor for p in params)
            and _restorable_type(inner))


class StepRestore:
    """Snapshot before `optimizer.step()`, masked restore after it (see the module docstring)."""

    def __init__(self, optimizer: Any):
        self._opt = getattr(optimizer, "optimizer", optimizer)
        self._ready = False
        self._live: list[torch.Tensor] = []
        self._snap: list[torch.Tensor] = []

    def ready(self) -> bool:
        """Whether every trainable parameter has its optimizer state, so that a snapshot covers the whole step."""
        if not self._ready:
            state = self._opt.state
            self._ready = all(p in state and len(state[p]) > 0 for p in _trainable(self._opt))
        return self._ready

    def _tensors(self) -> list[torch.Tensor]:
        """The parameters and their state tensors, each once: bitsandbytes shares one quantisation map between all
        parameters, and a restore pass is one kernel launch per tensor."""
        state = self._opt.state
        params = _trainable(self._opt)
        seen: set[int] = set()
        out: list[torch.Tensor] = []
        for t in params + [v for p in params for v in state[p].values()
                           if isinstance(v, torch.Tensor) and v.device == p.device]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    @torch.no_grad()
    def snapshot(self) -> None:
        live = self._tensors()
        same = len(live) == len(self._live) and all(
            a is b and a.shape == s.shape for a, b, s in zip(live, self._live, self._snap))
        if not same:  # first use, or the optimizer replaced a state tensor (a resume loads new ones)
            self._snap = [torch.empty_like(t) for t in live]
        self._live = live
        torch._foreach_copy_(self._snap, live)

    @torch.no_grad()
    def restore(self, flag: torch.Tensor) -> None:
        """Every snapshotted tensor back to its value before the step where `flag` (0-d, on the device) is set."""
        bad = flag.to(torch.bool)
        for live, snap in zip(self._live, self._snap):
            torch.where(bad, snap, live, out=live)


__all__ = ["RESTORABLE_TORCH_OPTIMIZERS", "RESTORE_DEVICES", "StepRestore", "supports_device_restore"]
