"""The batch prefetcher (library/train/prefetch.py): order, the last batch, exceptions, pinned non-blocking copies."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

from library.train import prefetch
from library.train.prefetch import Prefetcher


def _run(keys: list[int], enabled: bool = True, fail_on: int | None = None) -> tuple[list[str], list[str]]:
    """Take `keys` in order, prefetching the next one after each take (as the loop does); log who loaded what."""
    loads: list[str] = []
    got: list[str] = []

    def load(k: int):
        def run() -> str:
            loads.append(f"{k}@{'main' if threading.current_thread() is threading.main_thread() else 'worker'}")
            if k == fail_on:
                raise ValueError(f"cannot read batch {k}")
            return f"batch{k}"
        return run

    p: Prefetcher[str] = Prefetcher(enabled=enabled)
    try:
        for i, k in enumerate(keys):
            got.append(p.get(k, load(k)))
            if i + 1 < len(keys):
                p.ahead(keys[i + 1], load(keys[i + 1]))
    finally:
        p.close()
    return got, loads


def test_batches_come_in_order_and_the_next_loads_on_the_worker():
    got, loads = _run([0, 1, 2, 3])
    assert got == ["batch0", "batch1", "batch2", "batch3"]
    assert loads == ["0@main", "1@worker", "2@worker", "3@worker"]  # the last batch too, nothing after it


def test_disabled_prefetcher_loads_each_batch_when_taken():
    got, loads = _run([0, 1, 2], enabled=False)
    assert got == ["batch0", "batch1", "batch2"] and loads == ["0@main", "1@main", "2@main"]


def test_a_failed_load_raises_where_the_batch_is_taken():
    p: Prefetcher[str] = Prefetcher()
    p.ahead(1, lambda: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        p.get(1, lambda: "never")
    assert p.get(2, lambda: "loaded now") == "loaded now"
    p.close()
    with pytest.raises(ValueError, match="cannot read batch 2"):
        _run([0, 1, 2, 3], fail_on=2)


def test_an_unexpected_key_drops_the_prefetched_batch():
    p: Prefetcher[str] = Prefetcher()
    p.ahead(5, lambda: "five")
    assert p.get(6, lambda: "six") == "six"  # the plan changed (e.g. resume): load what is asked for
    assert p.get(5, lambda: "five again") == "five again"
    p.close()


@dataclass
class _Batch:
    latents: torch.Tensor | None
    captions: list[str]


def test_pin_tensors_only_with_cuda(monkeypatch):
    b = _Batch(torch.ones(2, 4), ["a", "b"])
    assert prefetch.pin_tensors(b) is b  # no GPU: nothing to gain from pinning
    pinned_calls = []

    def fake_pin(t):
        pinned_calls.append(t.shape)
        return t.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: False)
    out = prefetch.pin_tensors(b)
    assert out is not b and pinned_calls == [torch.Size([2, 4])]
    assert torch.equal(out.latents, b.latents) and out.captions == ["a", "b"]
