"""Load the next batch while the current one trains, and hand its tensors to the GPU without blocking.

The training step is: read the batch (cached latents and text-encoder outputs from disk or memory, or images), copy
it to the GPU, compute. Reading on the host while the GPU computes the previous batch hides the read; copying from
pinned (page-locked) memory with `non_blocking=True` lets the copy run by DMA, ordered on the stream, without the host
waiting for it.

`Prefetcher` runs one load ahead on one background thread. What makes that safe here: a batch's randomness comes from
per-item generators seeded by (seed, epoch, index) (library/data/dataset.py), never from a global RNG that the
training thread also draws from, so a batch loaded early is the batch that would have been loaded on time. The one
input that depends on *when* a batch is loaded is the training step (caption token warm-up); the loop prefetches only
when no dataset uses it.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Hashable, TypeVar

import torch

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """One load ahead, on one thread. `get(key, load)` returns the prefetched result for `key` (re-raising the
    load's exception, if it failed, to the caller that takes it), or loads now; `ahead(key, load)` starts the next
    load in the background. A prefetched result that is never taken is dropped at the next `ahead` or `close`."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[Hashable, Future] | None = None

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending_key, future = pending
            if pending_key == key:
                return future.result()  # the loader's exception, if any, surfaces here
            _discard(future)
        return load()

    def ahead(self, key: Hashable, load: Callable[[], T]) -> None:
        if not self.enabled:
            return
        if self._pending is not None:
            _discard(self._pending[1])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self._pending = (key, self._pool.submit(load))

    def wait(self) -> None:
        """Let the pending load finish (before something else reads the datasets on this thread)."""
        if self._pending is not None:
            _wait_quietly(self._pending[1])

    def close(self) -> None:
        if self._pending is not None:
            _discard(self._pending[1])
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _wait_quietly(future: Future) -> None:
    try:
        future.result()
    except BaseException:  # noqa: BLE001 - it will be re-raised to whoever takes it, or dropped
        pass


def _discard(future: Future) -> None:
    if not future.cancel():
        _wait_quietly(future)  # never leave a load running against the datasets


def pin_tensors(obj: T) -> T:
    """A copy of a batch (dataclass) whose CPU tensors are in pinned memory, where pinning helps: with a CUDA GPU.
    Without one, `obj` itself."""
    if not torch.cuda.is_available() or not dataclasses.is_dataclass(obj):
        return obj
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.is_pinned():
            changes[f.name] = value.pin_memory()
    return dataclasses.replace(obj, **changes) if changes else obj
