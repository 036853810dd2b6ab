"""--cpu_offload_checkpointing: gradient checkpointing whose saved inputs live in CPU memory.

Under gradient checkpointing a block keeps only its inputs for the backward (it re-runs its forward there). For a
deep denoiser at high resolution those inputs (one hidden-state tensor per block) are what still fills the GPU;
sd-scripts' flag moves them to the CPU and brings each back when its block is recomputed. Here the same is done by
running each checkpointed block under `torch.autograd.graph.save_on_cpu`: the non-reentrant checkpoint saves exactly
the block's inputs through the saved-tensor hooks, so those go to (pinned) CPU memory; the recompute in the backward
runs outside the hooks, so its activations stay on the device for the short time they live.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils.checkpoint


def offloading_checkpoint(module: Callable[..., Any], *args: Any) -> Any:
    """A diffusers `gradient_checkpointing_func`: checkpoint `module(*args)` with its saved inputs on the CPU."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def enable_checkpointing(model: Any, cpu_offload: bool) -> None:
    """Turn on the model's gradient checkpointing, with the inputs offloaded to the CPU when asked."""
    if cpu_offload:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=offloading_checkpoint)
    else:
        model.enable_gradient_checkpointing()
