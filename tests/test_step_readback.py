"""Host syncs on the training step (library/train/readback.py, issue #18): the per-step losses are read in groups,
and with an optimizer that can skip a step on the device (fused AdamW) the NaN guard reads nothing per step.

The sync counter patches the tensor methods that read a value back on the host (`item`, `tolist`, `cpu`, `__bool__`,
`__float__`) while the training loop runs. On the CPU these are not real device syncs, but they are exactly the calls
that would be on a GPU, so the count is what a GPU run would pay.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.train import readback
from library.train.readback import NonFiniteGuard, PendingLosses, StepRecord

pytestmark = pytest.mark.usefixtures("one_thread")
READ_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__")


def _record(step: int, loss: float, flag: float | None = None) -> StepRecord:
    return StepRecord(step, 0, torch.tensor(loss), 1e-3, 0.0, None if flag is None else torch.tensor(flag))


def test_pending_losses_read_in_order_with_flags():
    p = PendingLosses(every_s=math.inf, max_steps=3)
    assert p.read() == [] and not p.due()
    p.add(_record(1, 0.5))
    p.add(_record(2, 0.25))
    assert not p.due()
    p.add(_record(3, 0.125, flag=1.0))
    assert p.due()
    read = p.read()
    assert [(r.step, v, bad) for r, v, bad in read] == [(1, 0.5, False), (2, 0.25, False), (3, 0.125, True)]
    assert p.records == [] and not p.due()


def test_pending_losses_due_after_the_time_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(readback.time, "monotonic", lambda: clock[0])
    p = PendingLosses(every_s=1.0, max_steps=1000)
    p.add(_record(1, 1.0))
    assert not p.due()
    clock[0] += 1.5
    assert p.due()


def _params(n: int = 2) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("fused,deferred", [(True, True), (False, False)])
def test_guard_is_deferred_only_for_fused_optimizers(fused, deferred):
    opt = torch.optim.AdamW(_params(), lr=0.1, fused=fused)
    assert NonFiniteGuard(opt, scaler_active=False).deferred is deferred
    assert NonFiniteGuard(opt, scaler_active=True).deferred is False  # the fp16 scaler does its own skipping


def test_fused_adamw_skips_a_non_finite_step_on_the_device():
    params = _params()
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    guard = NonFiniteGuard(opt, scaler_active=False)
    for p in params:
        p.grad = torch.ones_like(p)
    flag = guard.arm(torch.tensor(1.0), params)
    opt.step()
    guard.disarm()
    assert float(flag) == 0.0
    after_good = [p.detach().clone() for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    params[1].grad = torch.tensor([1.0, float("nan"), 1.0])
    flag = guard.arm(torch.tensor(1.0), params)
    opt.step()
    guard.disarm()
    assert float(flag) == 1.0
    assert all(torch.equal(p, a) for p, a in zip(params, after_good))  # skipped: nothing moved
    assert [float(opt.state[p]["step"]) for p in params] == steps
    assert not hasattr(opt, "found_inf")
    assert float(readback.nonfinite_flag(torch.tensor(float("inf")), [])) == 1.0


@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf", "loss"])
def test_nonfinite_flag_is_exactly_0_or_1_and_leaves_the_gradients_alone(bad):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 7, generator=g), torch.randn(300, generator=g).bfloat16(), torch.randn(2, generator=g)]
    grads[0][1, 2] = -0.0
    if bad in ("nan", "inf", "-inf"):
        grads[1][17] = float(bad)
    before = [t.clone() for t in grads]
    loss = torch.tensor(float("inf") if bad == "loss" else 0.5)
    flag = readback.nonfinite_flag(loss, grads)
    assert flag.shape == () and flag.dtype == torch.float32
    assert float(flag) == (0.0 if bad is None else 1.0)  # fused optimizers skip only when found_inf == 1
    for a, b in zip(grads, before):  # the check scales by 1: every value is kept (-0.0 too; a NaN stays a NaN)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(a.signbit()[b.isfinite()], b.signbit()[b.isfinite()])
    assert float(readback.nonfinite_flag(None, [])) == 0.0


class SyncCounter:
    """Counts host read-backs of tensors while `active`."""

    def __init__(self, monkeypatch):
        self.active = False
        self.calls: list[str] = []
        for name in READ_METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        @functools.wraps(original)
        def counted(t, *a, **k):
            if self.active:
                self.calls.append(name)
            return original(t, *a, **k)
        return counted


def _train_counting(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch, steps: int, read_every: int,
                    **extra) -> tuple[SyncCounter, list[float], Path]:
    import sdxl_train_network
    from library.train import loop
    from test_train_sdxl_network import run_toml

    monkeypatch.setattr(loop, "PendingLosses", functools.partial(PendingLosses, every_s=math.inf,
                                                                 max_steps=read_every))
    counter = SyncCounter(monkeypatch)
    original_epochs = loop.Trainer._epochs

    def counted_epochs(self, *a, **k):
        counter.active = True
        try:
            return original_epochs(self, *a, **k)
        finally:
            counter.active = False

    monkeypatch.setattr(loop.Trainer, "_epochs", counted_epochs)
    results = []
    original_run = loop.Trainer.run
    monkeypatch.setattr(loop.Trainer, "run", lambda self: results.append(original_run(self)) or results[-1])
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=steps,
                   network_train_unet_only=True, cache_latents=True, cache_text_encoder_outputs=True, **extra)
    assert sdxl_train_network.main(["--config_file", cfg]) == 0
    return counter, results[0].losses, tmp_path / "run_loss.jsonl"


def test_no_per_step_read_back_with_a_fused_optimizer(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch):
    """6 steps, losses read every 3 steps: 2 read-backs in the loop (the last group is read at the end), not 6."""
    counter, losses, log = _train_counting(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch, steps=6,
                                           read_every=3, optimizer_args=["fused=True"])
    assert counter.calls == ["tolist", "tolist"], counter.calls
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == losses and all(math.isfinite(v) and v > 0 for v in losses)


def test_unfused_optimizer_keeps_the_per_step_guard(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch):
    """The counter sees the per-step guard of an optimizer that cannot skip on the device (so it can fail)."""
    counter, losses, _ = _train_counting(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch, steps=3,
                                         read_every=3)
    assert len(losses) == 3
    assert len(counter.calls) >= 3 + 1  # a guard read per step, plus the one loss read


def test_deferred_guard_stops_on_a_nan_gradient(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch):
    import sdxl_train_network
    from test_noise_and_optim import nan_gradient_at_step_2
    from test_train_sdxl_network import run_toml

    nan_gradient_at_step_2(monkeypatch)
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=3,
                   network_train_unet_only=True, optimizer_args=["fused=True"])
    with pytest.raises(UserError, match=r"not finite at step 2 \(epoch 1\): that optimizer step was skipped"):
        sdxl_train_network.main(["--config_file", cfg])
    assert not (tmp_path / "out" / "lora.safetensors").exists()  # the final network is not saved
    logged = [json.loads(line)["step"] for line in (tmp_path / "run_loss.jsonl").read_text().splitlines()]
    assert logged == [1, 3]  # read together at the end: the skipped step is not logged, the others are


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by bench/run_gpu_issue18.sh)")
@pytest.mark.parametrize("optimizer", [{"optimizer_args": ["fused=True"]}, {"optimizer_type": "AdamW8bit"}],
                         ids=["fused-AdamW", "AdamW8bit"])
def test_no_synchronising_cuda_call_from_our_code_on_the_step(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch,
                                                              optimizer):
    """With torch's sync debug mode on from the end of step 1 (lazy set-up done, the optimizer's state created) to
    the end of the loop, every call that makes the host wait for the GPU is reported with the Python line that made
    it. Of ours (library/, networks/), only the grouped loss read-back may appear; whatever else reports one is
    printed. Fused AdamW skips a non-finite step itself; AdamW8bit has it undone (library/train/step_restore.py)."""
    if "optimizer_type" in optimizer:
        pytest.importorskip("bitsandbytes")
    import sdxl_train_network
    from library.train import loop
    from test_train_sdxl_network import run_toml

    monkeypatch.setattr(loop, "PendingLosses", functools.partial(PendingLosses, every_s=math.inf, max_steps=3))
    original_after, original_epochs = loop.Trainer._after_step, loop.Trainer._epochs

    def after_step(self, *a, **k):
        out = original_after(self, *a, **k)
        if self.state.global_step == 1:
            torch.cuda.set_sync_debug_mode("warn")
        return out

    def epochs(self, *a, **k):
        try:
            return original_epochs(self, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loop.Trainer, "_after_step", after_step)
    monkeypatch.setattr(loop.Trainer, "_epochs", epochs)
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=7, network_train_unet_only=True,
                   cache_latents=True, cache_text_encoder_outputs=True, mixed_precision="bf16", **optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sdxl_train_network.main(["--config_file", cfg]) == 0
    syncs = [(Path(w.filename), w.lineno) for w in caught if "synchroniz" in str(w.message).lower()]
    print("\n".join(f"{f}:{n}" for f, n in syncs))
    root = Path(__file__).resolve().parents[1]
    ours = [(f, n) for f, n in syncs if f.resolve().is_relative_to(root / "library")
            or f.resolve().is_relative_to(root / "networks")]
    assert all(f.name == "readback.py" for f, _ in ours), ours
    assert len(ours) <= 3  # steps 2-7 read in groups of 3 (one sync each), the rest at the end
