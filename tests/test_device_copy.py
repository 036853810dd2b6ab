"""Host-to-GPU copies of the training step (library/device_copy.py, issue #18) and the SIGTERM agreement of
multi-process runs (library/train/rescue.py): neither may make the host wait for the GPU at every step.

Without a GPU, a spy stands in for the copy to `cuda` (it records the call and keeps the tensor on the host); the
test with a real GPU is `tests/test_step_readback.py::test_no_synchronising_cuda_call_from_our_code_on_the_step`."""
from __future__ import annotations

import types

import pytest
import torch

from library import device_copy
from library.train.rescue import StopSignal


@pytest.fixture
def copies(monkeypatch):
    """Records every Tensor.to call; a copy to a CUDA device returns a host clone instead of failing."""
    seen: list[dict] = []
    original = torch.Tensor.to

    def spy(t, *a, **k):
        device = k.get("device", a[0] if a and isinstance(a[0], (str, torch.device)) else None)
        dtype = k.get("dtype", a[0] if a and isinstance(a[0], torch.dtype) else None)
        seen.append({"device": None if device is None else torch.device(device).type, "dtype": dtype,
                     "non_blocking": bool(k.get("non_blocking", False)), "pinned": getattr(t, "_pinned", False)})
        if device is not None and torch.device(device).type == "cuda":
            return t.clone()
        return original(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    return seen


def test_host_to_gpu_copy_does_not_block_and_converts_on_the_gpu(copies):
    out = device_copy.to_device(torch.ones(3), "cuda", torch.float16)
    assert out.dtype == torch.float16
    # one transfer, non-blocking, without a dtype (a conversion asked of the copy happens on the host first) ...
    assert copies[0] == {"device": "cuda", "dtype": None, "non_blocking": True, "pinned": False}
    # ... then the conversion, on the copy
    assert copies[1]["device"] is None and copies[1]["dtype"] == torch.float16
    copies.clear()
    device_copy.to_device(torch.ones(3), torch.device("cuda", 0))
    assert len(copies) == 1 and copies[0]["non_blocking"] is True  # no conversion asked: none made


def test_pin_copies_into_pinned_memory_first(copies, monkeypatch):
    def fake_pin(t):
        c = t.clone()
        c._pinned = True
        return c

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: getattr(t, "_pinned", False))
    device_copy.to_device(torch.ones(3), "cuda", pin=True)
    assert copies == [{"device": "cuda", "dtype": None, "non_blocking": True, "pinned": True}]


def test_other_copies_are_plain(copies):
    out = device_copy.to_device(torch.ones(3, dtype=torch.float64), "cpu", torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, torch.ones(3))
    assert copies == [{"device": "cpu", "dtype": torch.float32, "non_blocking": False, "pinned": False}]


def test_sdxl_schedule_is_copied_to_the_device_once():
    """The per-step schedule lookups (noisy input, v target, SNR weights) index a schedule already on the device."""
    from library.families.sdxl import SDXLFamily

    fam = SDXLFamily()
    cfg = types.SimpleNamespace(zero_terminal_snr=False)
    first = fam.training_alphas_cumprod(cfg, torch.device("cpu"))
    assert fam.training_alphas_cumprod(cfg, torch.device("cpu")) is first
    assert torch.equal(first, fam.training_alphas_cumprod(cfg))
    zero = fam.training_alphas_cumprod(types.SimpleNamespace(zero_terminal_snr=True), torch.device("cpu"))
    assert zero is not first and float(zero[-1]) == 0.0


class _FakeAccelerator:
    """Two processes whose flags are summed; `others` is what the other process contributes at each call."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, others: list[float]):
        self.others = list(others)
        self.calls = 0

    def reduce(self, t: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        self.calls += 1
        return t + self.others.pop(0)


def test_sigterm_agreement_reads_the_sum_one_step_later():
    """The sum started at one boundary is read at the next: every boundary still makes exactly one all-reduce (the
    processes stay in step), and a SIGTERM on either process stops both at the same boundary."""
    stop = StopSignal()
    acc = _FakeAccelerator([0.0, 0.0, 1.0, 0.0])  # the other process gets SIGTERM before the third boundary
    answers = [stop.agreed(acc) for _ in range(4)]
    assert answers == [False, False, False, True] and acc.calls == 4

    stop = StopSignal()
    acc = _FakeAccelerator([0.0] * 4)
    assert stop.agreed(acc) is False
    stop.received = True  # this process gets it between boundaries 1 and 2
    assert [stop.agreed(acc) for _ in range(2)] == [False, True]


def test_single_process_sigterm_is_immediate():
    stop = StopSignal()
    acc = types.SimpleNamespace(num_processes=1)
    assert stop.agreed(acc) is False
    stop.received = True
    assert stop.agreed(acc) is True
