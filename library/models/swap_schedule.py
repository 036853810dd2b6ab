"""When to fetch and when to evict swapped blocks (--blocks_to_swap), kept apart from torch so it can be tested.

`SwapPlan` decides, each time a swapped block is about to run, which blocks must sit in the device's slots: the
block itself plus the next `prefetch` blocks expected to run, and evicts the rest. The expected order depends on the
phase the block runs in:

- "forward" (grad enabled: a training forward, checkpointed): the rest of the forward, then the backward, which
  re-runs the blocks last to first, then the next step's forward;
- "inference" (no grad: generation, sampling): the rest of this call, then the next call from block 0;
- "backward" (a checkpoint recompute inside the autograd engine): the remaining blocks last to first, then the next
  step's forward from block 0.

A wrong guess (say a grad-enabled forward that is never followed by a backward) only costs a copy: the block about
to run is always put first, so it is resident whatever was predicted. At most `prefetch + 1` blocks are resident (or
in flight) at any time: that is the number of device slots, and so the swapped blocks' device memory.

The `SwapStreams` protocol is what the executor (`library.models.lowvram.BlockSwapper`) needs from the hardware: an
event on the compute stream, a copy on a side stream that starts after an event, and a compute-stream wait on an
event. Nothing in it waits on the host, so there is no device-wide synchronisation. `InlineStreams` is the trivial
implementation for the CPU (copies happen at once); `CudaStreams` is the real one; tests inject a recording fake.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Phase = Literal["forward", "inference", "backward"]
PHASES: tuple[str, ...] = ("forward", "inference", "backward")


@dataclass(frozen=True)
class Fetch:
    """Copy block `block`'s weights into device slot `slot` (on the copy stream)."""

    block: int
    slot: int


@dataclass(frozen=True)
class Evict:
    """Block `block` leaves slot `slot`: its parameters point back at their host copy, and the slot may be reused
    once the compute stream is past everything given to it so far."""

    block: int
    slot: int


def expected_after(block: int, phase: Phase, n_blocks: int) -> Iterator[int]:
    """The swapped blocks expected to run after `block`, in order, without repeats and without `block` itself."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    if phase == "backward":
        order: list[int] = list(range(block - 1, -1, -1)) + list(range(n_blocks))
    elif phase == "forward":
        order = list(range(block + 1, n_blocks)) + list(range(n_blocks - 1, -1, -1))
    else:
        order = list(range(block + 1, n_blocks)) + list(range(n_blocks))
    seen = {block}
    for b in order:
        if b not in seen:
            seen.add(b)
            yield b


@dataclass
class SwapPlan:
    """The resident set of the swapped blocks and the moves that keep it right; pure bookkeeping, no tensors."""

    n_blocks: int
    prefetch: int = 1
    #: block -> the slot it occupies (resident, or its copy in flight)
    slot_of: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError("a swap plan needs at least one block")
        if self.prefetch < 0:
            raise ValueError(f"the number of blocks fetched ahead must be 0 or more, got {self.prefetch}")
        # more slots than blocks would only waste device memory
        self.prefetch = min(self.prefetch, self.n_blocks - 1)

    @property
    def n_slots(self) -> int:
        return self.prefetch + 1

    def wanted(self, block: int, phase: Phase) -> list[int]:
        """The block about to run, then the next `prefetch` blocks expected after it."""
        ahead = expected_after(block, phase, self.n_blocks)
        return [block] + [b for _, b in zip(range(self.prefetch), ahead)]

    def before(self, block: int, phase: Phase) -> list[Fetch | Evict]:
        """The moves to make right before `block` runs in `phase`: evictions first (they free slots), then the
        fetch of `block` if it is not resident, then the fetches ahead, in the order the blocks will run."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(f"block {block} of {self.n_blocks}")
        want = self.wanted(block, phase)
        moves: list[Fetch | Evict] = []
        for b in [b for b in self.slot_of if b not in want]:
            moves.append(Evict(b, self.slot_of.pop(b)))
        free = [s for s in range(self.n_slots) if s not in self.slot_of.values()]
        for b in want:
            if b not in self.slot_of:
                self.slot_of[b] = free.pop(0)
                moves.append(Fetch(b, self.slot_of[b]))
        return moves

    def release_all(self) -> list[Evict]:
        """Evict every resident block (e.g. before the swapper is removed)."""
        moves = [Evict(b, s) for b, s in self.slot_of.items()]
        self.slot_of.clear()
        return moves


# ------------------------------------------------------------------------------------------------------ streams
class SwapStreams(Protocol):
    """The stream operations block swapping needs; none of them makes the host wait."""

    def compute_event(self) -> Any:
        """An event marking everything the compute stream has been given so far (None where there is nothing to
        wait for)."""

    def copy(self, after: Any, pairs: Sequence[tuple[Any, Any]], label: tuple[int, int]) -> Any:
        """On the copy stream: wait for `after` (an event or None), copy each `src` into its `dst`, and return an
        event marking the copies done. `label` is (block, slot), for logs."""

    def wait(self, event: Any) -> None:
        """Make the compute stream (not the host) wait for `event`."""

    def drain(self) -> None:
        """Make the compute stream wait for every copy issued so far."""


class InlineStreams:
    """Copies at once, on the caller's thread: the CPU, where the "device" and the host are the same memory."""

    def compute_event(self) -> None:
        return None

    def copy(self, after: Any, pairs: Sequence[tuple[Any, Any]], label: tuple[int, int]) -> None:
        for dst, src in pairs:
            dst.copy_(src)

    def wait(self, event: Any) -> None:
        return None

    def drain(self) -> None:
        return None


class CudaStreams:
    """A side CUDA stream for the host-to-device copies, ordered against the compute stream by events only."""

    def __init__(self, device: Any) -> None:
        import torch

        self._torch = torch
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def _compute_stream(self) -> Any:
        # the stream the block runs on: in backward, the autograd engine sets it to the forward op's stream
        return self._torch.cuda.current_stream(self.device)

    def compute_event(self) -> Any:
        event = self._torch.cuda.Event()
        event.record(self._compute_stream())
        return event

    def copy(self, after: Any, pairs: Sequence[tuple[Any, Any]], label: tuple[int, int]) -> Any:
        with self._torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)  # from pinned memory: an asynchronous DMA
            done = self._torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def wait(self, event: Any) -> None:
        if event is not None:
            self._compute_stream().wait_event(event)

    def drain(self) -> None:
        self._compute_stream().wait_stream(self.copy_stream)


__all__ = ["PHASES", "CudaStreams", "Evict", "Fetch", "InlineStreams", "Phase", "SwapPlan", "SwapStreams",
           "expected_after"]
