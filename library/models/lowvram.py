"""Low-VRAM options for big transformers: fp8 storage of frozen Linear weights, and swapping blocks to the CPU.

fp8 base (`--fp8_base`): a frozen Linear's weight is stored in float8_e4m3fn (one byte per weight, half of bf16) with
a float32 scale per output row (so small weights do not fall into fp8's coarse subnormal range), and upcast to the
compute dtype inside the layer's forward, one layer at a time. The layer keeps being an `nn.Linear` (its class is
swapped for a subclass), so LoRA finds it by type; LoRA's `apply_to` saves the layer's bound `forward`, so fp8 must
be applied BEFORE networks are attached (an instance-level forward, i.e. an attached network, is refused). Merging a
LoRA into an fp8 layer is not supported: merge first, then apply fp8.

Block swapping (`--blocks_to_swap N`): the last N blocks keep their weights on the host, in one pinned buffer per
block (pinned only where the device is a CUDA GPU: pinned memory is what lets a copy run asynchronously, by DMA).
The device holds `prefetch + 1` slots, each a flat byte buffer as large as the largest swapped block. Right before a
swapped block runs, a forward pre-hook asks the schedule (`library.models.swap_schedule.SwapPlan`) which blocks must
be in the slots: the block itself and the next `prefetch` blocks expected to run (in forward order, and in the
backward, which re-runs the blocks last to first under gradient checkpointing, in reverse order). Blocks no longer
wanted are evicted: their parameters point back at their host views (the weights are frozen, so nothing is copied
back), and an event on the compute stream marks when the slot may be overwritten. Wanted blocks not resident are
copied, as raw bytes (so fp8 weights travel as fp8), into a free slot on a side stream that first waits for that
event; the compute stream waits for the copy's event only when the block is about to run. So block k+1's copy
overlaps block k's compute, with no host synchronisation anywhere.

Why fixed slots and `param.data` swaps rather than `Module.to(non_blocking=True)`: memory that `.to` allocates on
the side stream and frees after use goes back to the caching allocator's pool for that stream, and a later copy may
reuse it while the compute stream still reads it (unless every tensor is `record_stream`-ed); slots are never freed
while swapping, so the only hazard left is overwriting a slot, which the event above orders. Fixed slots also make the
device memory of swapping exactly `(prefetch + 1) x` the largest swapped block, whatever the schedule does, and one
block moves as a single copy. Swapping `.data` keeps each `nn.Parameter` object: autograd saves the parameter, so a
block's backward reads the slot it was recomputed from. In the backward a block stays in its slot until the next
block's recompute starts, which the autograd engine reaches only after the block's backward has been given to the
stream; its slot is then reused only after the event recorded at that moment.

The host buffer is the only master copy: swapped weights must be frozen (LoRA training and generation freeze them),
since an update made while a block sits in a slot would be lost at its eviction. On the CPU (tests, diagnostics) the
slots are CPU tensors and the copies run inline (`InlineStreams`), so the same path changes no number there either.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.models.swap_schedule import CudaStreams, Evict, Fetch, InlineStreams, Phase, SwapPlan, SwapStreams

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)

# Which Linears of a diffusers FluxTransformer2DModel go to fp8: every Linear inside the double and single blocks
# (attention, MLP and the adaLN modulation Linears). The embedders and the final layer stay in the compute dtype.
FLUX_FP8_INCLUDE: tuple[str, ...] = (r"^transformer_blocks\.\d+\.", r"^single_transformer_blocks\.\d+\.")
# The block lists of a FLUX transformer, in the order they run.
FLUX_BLOCK_LISTS: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks")


# ---------------------------------------------------------------------------------------------------------- fp8
class _Fp8Storage:
    """What an fp8 layer keeps: the weight in fp8, a float32 scale per output channel, the compute dtype."""

    compute_dtype: torch.dtype
    weight_scale: torch.Tensor

    def _upcast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dtype = self.compute_dtype
        weight = self.weight.to(dtype) * self.weight_scale.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)
        return x, weight, bias

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


class Fp8Linear(_Fp8Storage, nn.Linear):
    """An nn.Linear whose weight is stored in fp8 (with a per-row scale) and upcast per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = self._upcast(x)
        return F.linear(x, weight, bias)


class Fp8Conv2d(_Fp8Storage, nn.Conv2d):
    """An nn.Conv2d whose weight is stored in fp8 (with a per-output-channel scale) and upcast per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = self._upcast(x)
        return self._conv_forward(x, weight, bias)


_FP8_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


@torch.no_grad()
def _to_fp8(layer: nn.Linear | nn.Conv2d, compute_dtype: torch.dtype,
            work_device: torch.device | None = None) -> None:
    home = layer.weight.device
    w = layer.weight.detach().to(work_device or home).float()
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)  # one scale per output row / channel
    scale = (w.abs().flatten(1).amax(dim=1) / FP8_MAX).clamp(min=1e-12).reshape(shape)
    layer.weight = nn.Parameter((w / scale).to(FP8_DTYPE).to(home), requires_grad=False)
    layer.register_buffer("weight_scale", scale.to(home), persistent=False)
    layer.__class__ = _FP8_CLASSES[nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear]
    layer.compute_dtype = compute_dtype


def apply_fp8_linear(module: nn.Module, compute_dtype: torch.dtype,
                     include: Sequence[str] = FLUX_FP8_INCLUDE, work_device: torch.device | str | None = None,
                     convs: bool = False) -> int:
    """Store the Linears (and with `convs` the Conv2ds) whose names match one of the `include` regexes in fp8,
    frozen; returns how many.

    Call after the model has its device and dtype (a later `.to(dtype)` would cast the fp8 weights) and before any
    network is attached to it. `work_device`: where to quantize, one layer at a time (the compute device, so that
    blocks kept on the CPU by swapping get bit-for-bit the fp8 weights they would get on the GPU)."""
    if compute_dtype in (FP8_DTYPE, torch.float8_e5m2):
        raise UserError("--fp8_base: the compute dtype must be float32, float16 or bfloat16, not fp8")
    kinds = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    patterns = [re.compile(p) for p in include]
    count = 0
    for name, sub in module.named_modules():
        if not isinstance(sub, kinds) or isinstance(sub, _Fp8Storage):
            continue
        if isinstance(sub, nn.Conv2d) and type(sub) is not nn.Conv2d:
            continue  # a Conv2d subclass with a forward of its own: leave it as it is
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


#: blocks fetched ahead of the one running, by default: one block's copy overlaps the previous block's compute
DEFAULT_SWAP_PREFETCH = 1
_ALIGN = 256  # bytes: every tensor in a slot starts on a boundary any dtype (and the CUDA copy engine) is happy with


@dataclass
class _Entry:
    """One parameter or buffer of a swapped block, and where its bytes sit in the block's flat layout."""

    module: nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size
    host: torch.Tensor  # a view into the block's flat host buffer


@dataclass
class _BlockStore:
    host: torch.Tensor  # flat uint8, pinned where the device is a CUDA GPU
    entries: list[_Entry]

    def point_at(self, flat: torch.Tensor | None) -> None:
        """Make the block's parameters and buffers views into `flat` (a device slot), or into the host buffer."""
        for e in self.entries:
            t = e.host if flat is None else flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
            if e.is_param:
                e.module._parameters[e.name].data = t
            else:
                e.module._buffers[e.name] = t


def _tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    out = []
    for module in block.modules():
        out += [(module, n, True, p) for n, p in module._parameters.items() if p is not None]
        out += [(module, n, False, b) for n, b in module._buffers.items() if b is not None]
    return out


def _store(block: nn.Module, pin: bool) -> _BlockStore:
    """Copy the block's weights into one flat host buffer (pinned when `pin`) and point the block at it."""
    items, offset, layout = _tensors(block), 0, []
    for item in items:
        t = item[3]
        layout.append(offset)
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    host = torch.empty(max(offset, _ALIGN), dtype=torch.uint8, pin_memory=pin)
    entries = []
    for (module, name, is_param, t), off in zip(items, layout, strict=True):
        nbytes = t.numel() * t.element_size()
        view = host[off:off + nbytes].view(t.dtype).view(t.shape)
        with torch.no_grad():
            view.copy_(t.detach())
        entries.append(_Entry(module, name, is_param, off, nbytes, t.dtype, t.shape, view))
    store = _BlockStore(host, entries)
    store.point_at(None)
    return store


def _phase() -> Phase:
    if _in_backward():
        return "backward"
    return "forward" if torch.is_grad_enabled() else "inference"


@dataclass
class BlockSwapper:
    """Keeps `blocks`' weights on the host and streams them through `prefetch + 1` device slots (module doc)."""

    blocks: list[nn.Module]
    device: torch.device
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prefetch: int = DEFAULT_SWAP_PREFETCH
    streams: SwapStreams | None = None
    #: ("in" | "out", block index) per fetch / eviction, in order: for tests and for debugging
    events: list[tuple[str, int]] = field(default_factory=list)
    record: bool = False
    plan: SwapPlan = field(init=False)
    _stores: list[_BlockStore] = field(default_factory=list)
    _slots: list[torch.Tensor] = field(default_factory=list)
    _slot_free: list = field(default_factory=list)  # per slot: compute event after its last occupant's use
    _ready: dict = field(default_factory=dict)  # block -> event of its copy, until the compute stream waited on it
    _handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.plan = SwapPlan(len(self.blocks), self.prefetch)
        self.prefetch = self.plan.prefetch
        if self.streams is None:
            self.streams = CudaStreams(self.device) if self.device.type == "cuda" else InlineStreams()

    @classmethod
    def attach(cls, model: nn.Module, n_blocks: int, device: torch.device | str,
               offload_device: torch.device | str = "cpu", block_lists: Iterable[str] = FLUX_BLOCK_LISTS,
               record: bool = False, prefetch: int = DEFAULT_SWAP_PREFETCH,
               streams: SwapStreams | None = None) -> BlockSwapper:
        """Swap the last `n_blocks` blocks of `model` (in run order): put their weights in host buffers now,
        allocate the device slots, and hook the blocks so that each is in a slot when it runs. `prefetch`: how many
        blocks are copied ahead of the running one; `streams`: injectable for tests (default: CUDA streams on a
        GPU, inline copies on the CPU)."""
        device = torch.device(device)
        if torch.device(offload_device).type != "cpu":
            raise UserError(f"--blocks_to_swap keeps blocks in host memory, not on {offload_device}")
        swapper = cls(blocks=swapped_blocks(model, n_blocks, block_lists), device=device,
                      offload_device=torch.device(offload_device), record=record, prefetch=prefetch, streams=streams)
        pin = device.type == "cuda" and torch.cuda.is_available()
        swapper._stores = [_store(block, pin) for block in swapper.blocks]
        size = max(s.host.numel() for s in swapper._stores)
        # filled with 0xFF (NaN in every float dtype) so that a block run from a slot never copied into shows
        swapper._slots = [torch.full((size,), 255, dtype=torch.uint8, device=device)
                          for _ in range(swapper.plan.n_slots)]
        swapper._slot_free = [None] * swapper.plan.n_slots
        for i, block in enumerate(swapper.blocks):
            swapper._handles.append(block.register_forward_pre_hook(swapper._pre_hook(i)))
        return swapper

    @property
    def slot_bytes(self) -> int:
        """Device memory of one slot: the largest swapped block, with each tensor aligned."""
        return self._slots[0].numel() if self._slots else 0

    @property
    def _resident(self) -> list[int]:
        return list(self.plan.slot_of)

    def detach(self) -> None:
        """Remove the hooks and give every swapped block its own device copy again (the slots are released)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.offload_all()
        self.streams.drain()
        for store in self._stores:
            for e in store.entries:
                t = e.host.to(self.device, copy=True)
                if e.is_param:
                    e.module._parameters[e.name].data = t
                else:
                    e.module._buffers[e.name] = t
        self._stores, self._slots, self._slot_free, self._ready = [], [], [], {}

    # --- moves ----------------------------------------------------------------------------------------------
    def _apply(self, moves: list[Fetch | Evict]) -> None:
        for move in moves:
            store = self._stores[move.block]
            if isinstance(move, Evict):
                self._slot_free[move.slot] = self.streams.compute_event()
                self._ready.pop(move.block, None)
                store.point_at(None)
                if self.record:
                    self.events.append(("out", move.block))
            else:
                slot = self._slots[move.slot]
                size = store.host.numel()
                self._ready[move.block] = self.streams.copy(self._slot_free[move.slot],
                                                            [(slot[:size], store.host)], (move.block, move.slot))
                store.point_at(slot)
                if self.record:
                    self.events.append(("in", move.block))

    def _pre_hook(self, i: int):
        def hook(module: nn.Module, args):
            self._apply(self.plan.before(i, _phase()))
            event = self._ready.pop(i, None)
            if event is not None:
                self.streams.wait(event)
        return hook

    def offload_all(self) -> None:
        """Evict every resident block (its weights point at the host again; nothing is copied)."""
        self._apply(self.plan.release_all())


__all__ = ["DEFAULT_SWAP_PREFETCH", "FLUX_BLOCK_LISTS", "FLUX_FP8_INCLUDE", "BlockSwapper", "Fp8Linear",
           "Fp8Conv2d", "apply_fp8_linear", "linear_weight_bytes", "model_blocks", "place_module", "swapped_blocks"]
