"""--fused_backward_pass: each parameter steps as soon as its gradient is complete in the backward pass, and its
gradient is freed right there, so the gradients of the whole network never exist at once (sd-scripts' full
fine-tuners do this for Adafactor; its LoRA trainers accept the flag under the same rules).

How: a `register_post_accumulate_grad_hook` on every trainable parameter clips that gradient on its own (sd-scripts'
rule: with --max_grad_norm each tensor is clipped to the norm by itself, not the whole network), calls the
optimizer's `step()` with the parameter groups narrowed to that one parameter, and sets the gradient to None. That is
exact for optimizers whose update of a parameter reads only that parameter's gradient and state (the list below);
optimizers that pool statistics over all parameters (D-Adaptation, Prodigy) or count steps per group (schedule-free)
would change their update, so they are refused, as sd-scripts refuses every optimizer but Adafactor. The loop's own
clip / `optimizer.step()` / `zero_grad()` after the backward then find no gradient and change nothing.

Where the per-parameter step cannot be exact, the run trains with the usual step after the backward and says so
once: fp16 loss scaling (the scaler must see every gradient before any step) and several processes (gradients are
averaged across processes after the backward). A non-finite gradient is detected without a device sync per
parameter: a flag on the device collects it. Optimizers that skip a step on the device from a `found_inf` tensor
(torch's fused AdamW, the default on CUDA; see library/train/readback.py) get each parameter's flag, so a non-finite
gradient never reaches its weights, and the backward's flag is not read there: it waits with the step's loss, and the
run stops at the next loss read, as without the flag. With the others the parameters step before the flag can be
known, so it is read once at the end of each backward, which then stops the run. (The snapshot that lets the usual
step undo a bad step for them, library/train/step_restore.py, would cost more memory than this flag saves.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from library.config.environment_flags import warn_once
from library.config.train_config import RunConfig
from library.errors import UserError
from library.train.optim import optimizer_name

# --optimizer_type names (lower-case) whose step updates each parameter from its own gradient and state only
PER_PARAMETER_OPTIMIZERS: frozenset[str] = frozenset({
    "adamw", "adam", "sgd", "sgdnesterov", "adafactor", "lion", "adamw8bit", "lion8bit", "sgdnesterov8bit",
    "pagedadamw", "pagedadamw8bit", "pagedadamw32bit", "pagedlion8bit",
})


def check_fused_backward(cfg: RunConfig) -> None:
    """sd-scripts' rules (train_util.get_optimizer), before any model loads: one gradient per optimizer step, and an
    optimizer that can step one parameter at a time."""
    if not getattr(cfg.optimizer, "fused_backward_pass", False):
        return
    if cfg.training.gradient_accumulation_steps != 1:
        raise UserError("--fused_backward_pass steps each parameter during the backward pass, so it cannot "
                        f"accumulate gradients: drop it or use --gradient_accumulation_steps 1 (got "
                        f"{cfg.training.gradient_accumulation_steps})")
    name = optimizer_name(cfg.optimizer)
    if name.lower() not in PER_PARAMETER_OPTIMIZERS:
        raise UserError(f"--fused_backward_pass does not work with --optimizer_type {name}: its step is not per "
                        "parameter; use one of AdamW, Adam, SGD, SGDNesterov, Adafactor, Lion, AdamW8bit, Lion8bit, "
                        "SGDNesterov8bit, PagedAdamW(8bit/32bit), PagedLion8bit, or drop the flag")


@dataclass
class FusedBackward:
    """The hooks of one run; `remove()` takes them off (tests, or a caller that wants the usual step back)."""

    optimizer: torch.optim.Optimizer
    max_grad_norm: float
    handles: list[Any] = field(default_factory=list)
    nonfinite: torch.Tensor | None = None  # device flag, set by any non-finite gradient of the current backward
    device_skip: bool = False  # the optimizer reads `found_inf` (torch's fused Adam/AdamW/SGD)
    step_flag: torch.Tensor | None = None  # device_skip: the last backward's flag, for the loop to read later
    _callback_queued: bool = False

    def attach(self) -> FusedBackward:
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    self.handles.append(param.register_post_accumulate_grad_hook(self._hook(group)))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, group: dict[str, Any]):
        def hook(param: torch.Tensor) -> None:
            bad = self._watch(param.grad)
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
            if self.device_skip:  # torch's fused step skips this parameter on the device when the flag is set
                self.optimizer.found_inf = bad.float()
            try:
                step_one(self.optimizer, group, param)
            finally:
                if self.device_skip:
                    del self.optimizer.found_inf
            param.grad = None
        return hook

    def _watch(self, grad: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(grad).all()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
        return bad

    def _after_backward(self) -> None:
        flag, self.nonfinite, self._callback_queued = self.nonfinite, None, False
        if flag is None:
            return
        if self.device_skip:  # no read here: the flag waits with the step's loss and the loop stops at its read
            self.step_flag = flag.float() if self.step_flag is None else torch.maximum(self.step_flag, flag.float())
            return
        if bool(flag):  # the one read-back per backward
            raise UserError("the gradient is not finite: with --fused_backward_pass the parameters have already "
                            "stepped on it, so the network is damaged from this step on. Lower the learning rate, "
                            "use bf16 instead of fp16, and resume from the last --save_state folder")

    def take_flag(self) -> torch.Tensor | None:
        """The device flag of the backward passes since the last call (device_skip only), and forget it."""
        flag, self.step_flag = self.step_flag, None
        return flag


def step_one(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> None:
    """`optimizer.step()` for one parameter: the groups narrowed to it (hyper-parameters the step writes back, such
    as a scheduler's lr, stay in the real group)."""
    narrowed = dict(group, params=[param])
    groups = optimizer.param_groups
    optimizer.param_groups = [narrowed]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups
    for key, value in narrowed.items():
        if key != "params":
            group[key] = value


def attach_fused_backward(optimizer: Any, cfg: RunConfig, accelerator: Any) -> FusedBackward | None:
    """Hook the run's optimizer (accelerate's wrapper or a bare one) into the backward pass, or say once why this run
    steps after the backward as usual; None when the flag is off or cannot apply."""
    if not getattr(cfg.optimizer, "fused_backward_pass", False):
        return None
    check_fused_backward(cfg)
    if getattr(accelerator, "scaler", None) is not None:
        warn_once(["--fused_backward_pass: fp16 loss scaling must see every gradient before any step, so the "
                   "optimizer steps after the backward pass as usual (use --mixed_precision bf16 to fuse it)"])
        return None
    if getattr(accelerator, "num_processes", 1) > 1:
        warn_once(["--fused_backward_pass: with several processes the gradients are averaged across them after the "
                   "backward pass, so the optimizer steps after it as usual"])
        return None
    from library.train.readback import supports_device_skip

    inner = getattr(optimizer, "optimizer", optimizer)
    fused = FusedBackward(inner, float(cfg.optimizer.max_grad_norm or 0.0),
                          device_skip=supports_device_skip(inner)).attach()
    print(f"--fused_backward_pass: {len(fused.handles)} parameters step during the backward pass")
    return fused


__all__ = ["FusedBackward", "PER_PARAMETER_OPTIMIZERS", "attach_fused_backward", "check_fused_backward", "step_one"]
