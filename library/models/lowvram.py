"""Low-VRAM options for big transformers: fp8 storage of frozen Linear weights, and swapping blocks to the CPU.

fp8 base (`--fp8_base`): a frozen Linear's weight is stored in float8_e4m3fn (one byte per weight, half of bf16) with
a float32 scale per output row (so small weights do not fall into fp8's coarse subnormal range), and upcast to the
compute dtype inside the layer's forward, one layer at a time. The layer keeps being an `nn.Linear` (its class is
swapped for a subclass), so LoRA finds it by type; LoRA's `apply_to` saves the layer's bound `forward`, so fp8 must
be applied BEFORE networks are attached (an instance-level forward, i.e. an attached network, is refused). Merging a
LoRA into an fp8 layer is not supported: merge first, then apply fp8.

Block swapping (`--blocks_to_swap N`): the last N blocks live on the offload device (the CPU); a forward pre-hook
moves a block onto the compute device just before it runs and a forward post-hook moves it back afterwards. In
training the swapped blocks must run under gradient checkpointing: the backward pass then re-runs each block's
forward (which moves it in again) right before that block's backward. During such a recompute the block is kept
resident, and evicted when the next block is brought in, so at most two swapped blocks sit on the device at once.
Moves use `Module.to`, which swaps each parameter's `.data`: tensors autograd saved keep following the parameter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)

# Which Linears of a diffusers FluxTransformer2DModel go to fp8: every Linear inside the double and single blocks
# (attention, MLP and the adaLN modulation Linears). The embedders and the final layer stay in the compute dtype.
FLUX_FP8_INCLUDE: tuple[str, ...] = (r"^transformer_blocks\.\d+\.", r"^single_transformer_blocks\.\d+\.")
# The block lists of a FLUX transformer, in the order they run.
FLUX_BLOCK_LISTS: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks")


# ---------------------------------------------------------------------------------------------------------- fp8
class Fp8Linear(nn.Linear):
    """An nn.Linear whose weight is stored in fp8 (with a per-row scale) and upcast per call."""

    compute_dtype: torch.dtype
    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        weight = self.weight.to(dtype) * self.weight_scale.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)
        return F.linear(x, weight, bias)

    def _apply(self, fn, recurse: bool = True):
        """Moves follow `.to(device)`, but a dtype cast of the whole model (e.g. `.to(torch.bfloat16)`) must not
        turn the fp8 storage or the float32 scales into something the forward would misread."""
        weight, scale = self.weight.data, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != weight.dtype:
            self.weight.data = weight.to(self.weight.device)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self


@torch.no_grad()
def _to_fp8(layer: nn.Linear, compute_dtype: torch.dtype, work_device: torch.device | None = None) -> None:
    home = layer.weight.device
    w = layer.weight.detach().to(work_device or home).float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    layer.weight = nn.Parameter((w / scale).to(FP8_DTYPE).to(home), requires_grad=False)
    layer.register_buffer("weight_scale", scale.to(home), persistent=False)
    layer.__class__ = Fp8Linear
    layer.compute_dtype = compute_dtype


def apply_fp8_linear(module: nn.Module, compute_dtype: torch.dtype,
                     include: Sequence[str] = FLUX_FP8_INCLUDE, work_device: torch.device | str | None = None) -> int:
    """Store the Linears whose names match one of the `include` regexes in fp8, frozen; returns how many.

    Call after the model has its device and dtype (a later `.to(dtype)` would cast the fp8 weights) and before any
    network is attached to it. `work_device`: where to quantize, one layer at a time (the compute device, so that
    blocks kept on the CPU by swapping get bit-for-bit the fp8 weights they would get on the GPU)."""
    if compute_dtype in (FP8_DTYPE, torch.float8_e5m2):
        raise UserError("--fp8_base: the compute dtype must be float32, float16 or bfloat16, not fp8")
    patterns = [re.compile(p) for p in include]
    count = 0
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear) or isinstance(sub, Fp8Linear):
            continue
        if not any(p.search(name) for p in patterns):
            continue
        if "forward" in sub.__dict__:
            raise UserError(f"--fp8_base: '{name}' already has a network attached; fp8 must be applied first")
        _to_fp8(sub, compute_dtype, torch.device(work_device) if work_device is not None else None)
        count += 1
    return count


def linear_weight_bytes(module: nn.Module, include_scales: bool = True) -> int:
    """Bytes held by the weights of the Linears in `module`: what --fp8_base halves. The fp8 scales add 4 bytes per
    output row (4 / in_features of the fp8 weight: 0.1% for FLUX's 3072-wide layers)."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += sub.weight.numel() * sub.weight.element_size()
            scale = getattr(sub, "weight_scale", None)
            if scale is not None and include_scales:
                total += scale.numel() * scale.element_size()
    return total


# ---------------------------------------------------------------------------------------------------- swapping
def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (a checkpoint recompute happens there)."""
    return torch._C._current_graph_task_id() != -1


def model_blocks(model: nn.Module, block_lists: Iterable[str] = FLUX_BLOCK_LISTS) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for name in block_lists:
        blocks += list(getattr(model, name, None) or [])
    return blocks


def swapped_blocks(model: nn.Module, n_blocks: int, block_lists: Iterable[str] = FLUX_BLOCK_LISTS) -> list[nn.Module]:
    """The last `n_blocks` blocks in run order: the ones --blocks_to_swap keeps on the offload device."""
    blocks = model_blocks(model, block_lists)
    if not 1 <= n_blocks <= len(blocks):
        raise UserError(f"--blocks_to_swap {n_blocks}: expected 1 to {len(blocks)} (this model has "
                        f"{len(blocks)} blocks)")
    return blocks[len(blocks) - n_blocks:]


def place_module(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None,
                 kept_off: Sequence[nn.Module] = ()) -> None:
    """Cast to `dtype` where the weights are (the CPU), then move to `device` all but the submodules in `kept_off`
    (blocks --blocks_to_swap keeps on the CPU): the device never holds an fp32 copy, nor a block that is swapped."""
    if dtype is not None:
        module.to(dtype)
    if not kept_off:
        module.to(device)
        return
    skip = {id(m) for m in kept_off}

    def visit(m: nn.Module) -> None:
        if id(m) in skip:
            return
        m._apply(lambda t: t.to(device), recurse=False)  # this module's own parameters and buffers, as .to does
        for child in m.children():
            visit(child)

    visit(module)


@dataclass
class BlockSwapper:
    """Keeps `blocks` on `offload_device` and brings each onto `device` only while it runs (see the module doc)."""

    blocks: list[nn.Module]
    device: torch.device
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: ("in" | "out", block index) per move, in order: for tests and for debugging
    events: list[tuple[str, int]] = field(default_factory=list)
    record: bool = False
    _resident: list[int] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    @classmethod
    def attach(cls, model: nn.Module, n_blocks: int, device: torch.device | str,
               offload_device: torch.device | str = "cpu", block_lists: Iterable[str] = FLUX_BLOCK_LISTS,
               record: bool = False) -> "BlockSwapper":
        """Swap the last `n_blocks` blocks of `model` (in run order): move them to `offload_device` now and hook
        them so that each visits `device` only while it runs."""
        swapper = cls(blocks=swapped_blocks(model, n_blocks, block_lists), device=torch.device(device),
                      offload_device=torch.device(offload_device), record=record)
        for i, block in enumerate(swapper.blocks):
            block.to(swapper.offload_device)
            swapper._handles.append(block.register_forward_pre_hook(swapper._pre_hook(i)))
            swapper._handles.append(block.register_forward_hook(swapper._post_hook(i)))
        return swapper

    def detach(self) -> None:
        """Remove the hooks and bring every swapped block back to the compute device."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for i in list(range(len(self.blocks))):
            self._move_in(i)
        self._resident.clear()

    # --- moves ----------------------------------------------------------------------------------------------
    def _move_in(self, i: int) -> None:
        self.blocks[i].to(self.device)
        if self.record:
            self.events.append(("in", i))

    def _move_out(self, i: int) -> None:
        self.blocks[i].to(self.offload_device)
        if self.record:
            self.events.append(("out", i))

    def _pre_hook(self, i: int):
        def hook(module: nn.Module, args):
            for other in [j for j in self._resident if j != i]:  # done with it: a recompute left it resident
                self._move_out(other)
                self._resident.remove(other)
            if i not in self._resident:
                self._move_in(i)
                self._resident.append(i)
        return hook

    def _post_hook(self, i: int):
        def hook(module: nn.Module, args, output):
            # a checkpoint recompute runs inside backward, and the block's backward still needs its weights
            if not _in_backward() and i in self._resident:
                self._move_out(i)
                self._resident.remove(i)
        return hook

    def offload_all(self) -> None:
        """Send any block left resident (the last one recomputed in a backward) back to the offload device."""
        for i in list(self._resident):
            self._move_out(i)
        self._resident.clear()


__all__ = ["BlockSwapper", "FLUX_BLOCK_LISTS", "FLUX_FP8_INCLUDE", "Fp8Linear", "apply_fp8_linear",
           "linear_weight_bytes", "model_blocks", "place_module", "swapped_blocks"]
