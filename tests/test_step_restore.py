"""The NaN guard for optimizers without `found_inf` (library/train/step_restore.py): bitsandbytes' AdamW8bit and
torch's unfused AdamW step anyway and have a non-finite step undone on the device, with no per-step host read.

The restore is meant for CUDA; here `RESTORE_DEVICES` is widened to the CPU so that the same code runs.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from library.errors import UserError
from library.train import step_restore
from library.train.readback import NonFiniteGuard
from library.train.step_restore import StepRestore, supports_device_restore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(step_restore, "RESTORE_DEVICES", ("cpu",))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 64x128 = 8192 weights: above bitsandbytes' 4096-element threshold, so its state really is 8-bit (uint8 + scales)
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 8))


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "AdamW8bit":
        bnb = pytest.importorskip("bitsandbytes")
        return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=1e-2, foreach=False)


def _grads(model: torch.nn.Module, seed: int, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    if nan:
        next(model.parameters()).grad[3, 5] = float("nan")


def _state_tensors(opt) -> list[torch.Tensor]:
    return [v.clone() for s in opt.state.values() for k, v in sorted(s.items())
            if isinstance(v, torch.Tensor) and k != "step"]


def test_restore_is_meant_for_cuda_and_tensor_only_optimizers(on_cpu, monkeypatch):
    params = list(_model().parameters())
    assert supports_device_restore(torch.optim.AdamW(params, lr=1e-3, foreach=False))
    assert not supports_device_restore(torch.optim.LBFGS(params))  # its state is not only tensors
    bnb = pytest.importorskip("bitsandbytes")
    assert supports_device_restore(bnb.optim.AdamW8bit(params, lr=1e-3))
    assert not supports_device_restore(bnb.optim.PagedAdamW8bit(params, lr=1e-3))  # a snapshot would undo paging
    monkeypatch.setattr(step_restore, "RESTORE_DEVICES", ("cuda",))
    assert not supports_device_restore(torch.optim.AdamW(params, lr=1e-3, foreach=False))  # on the CPU: host read


@pytest.mark.parametrize("kind", ["AdamW8bit", "AdamW"])
def test_guarded_steps_equal_plain_ones_and_a_nan_step_changes_nothing(on_cpu, kind):
    plain_model, model = _model(), _model()
    plain, opt = _optimizer(kind, plain_model.parameters()), _optimizer(kind, model.parameters())
    guard = NonFiniteGuard(opt, scaler_active=False)
    params = list(model.parameters())
    flags = []
    for step in range(4):
        _grads(plain_model, step)
        plain.step()
        _grads(model, step)
        assert guard.deferred is (step > 0)  # the first step creates the state: nothing to snapshot before it
        if guard.deferred:
            flags.append(guard.arm(torch.tensor(1.0), params))
        opt.step()
        guard.disarm()
    assert [float(f) for f in flags] == [0.0, 0.0, 0.0]
    for a, b in zip(plain_model.parameters(), params):
        assert torch.equal(a, b)  # bit for bit: the snapshot and restore change no finite step
    for a, b in zip(_state_tensors(plain), _state_tensors(opt)):
        assert torch.equal(a, b)

    before_params = [p.detach().clone() for p in params]
    before_state = _state_tensors(opt)
    _grads(model, 99, nan=True)
    flag = guard.arm(torch.tensor(1.0), params)
    opt.step()
    assert not all(torch.isfinite(p).all() for p in params)  # the optimizer did step on the NaN...
    guard.disarm()
    assert float(flag) == 1.0
    assert all(torch.equal(p, b) for p, b in zip(params, before_params))  # ...and the step was undone
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(opt), before_state))

    _grads(model, 5)  # a finite step after it trains again
    guard.arm(torch.tensor(1.0), params)
    opt.step()
    guard.disarm()
    assert not all(torch.equal(p, b) for p, b in zip(params, before_params))
    assert all(torch.isfinite(p).all() for p in params)


def test_a_shared_state_tensor_is_snapshotted_once(on_cpu):
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False), torch.nn.Linear(64, 128, bias=False))
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2)  # both weights are 8-bit (8192 elements each)
    _grads(model, 0)
    opt.step()
    tensors = StepRestore(opt)._tensors()
    assert len({id(t) for t in tensors}) == len(tensors)
    maps = [s["qmap1"] for s in opt.state.values()]  # bitsandbytes 0.4x-0.5x: one map shared by every parameter
    assert len(maps) == 2
    assert sum(any(t is m for m in maps) for t in tensors) == len({id(m) for m in maps})  # each map copied once


def test_a_resumed_state_gets_new_snapshot_buffers(on_cpu):
    model = _model()
    opt = _optimizer("AdamW", model.parameters())
    params = list(model.parameters())
    restore = StepRestore(opt)
    _grads(model, 0)
    opt.step()
    restore.snapshot()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as --resume does: new state tensors
    restore.snapshot()
    before = _state_tensors(opt)
    _grads(model, 1, nan=True)
    opt.step()
    restore.restore(torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(opt), before))
    assert all(torch.isfinite(p).all() for p in params)


def test_adamw8bit_run_reads_nothing_per_step_and_stops_on_a_nan(tmp_path, tiny_sdxl_file, shapes_dataset,
                                                                  monkeypatch, on_cpu):
    """Through the script: AdamW8bit, losses read every 3 steps. Only step 1 (state creation) reads on the host;
    a NaN gradient at step 2 is undone and stops the run at the next read, and the rescued network is finite."""
    pytest.importorskip("bitsandbytes")
    import sdxl_train_network
    from safetensors.torch import load_file

    from test_noise_and_optim import nan_gradient_at_step_2
    from test_step_readback import _train_counting

    counter, losses, log = _train_counting(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch, steps=6,
                                           read_every=3, optimizer_type="AdamW8bit")
    reads_first_step = len(counter.calls) - 2  # the two grouped loss reads
    assert counter.calls[-2:] == ["tolist", "tolist"] and 1 <= reads_first_step <= 3, counter.calls
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)

    from test_train_sdxl_network import run_toml

    nan_gradient_at_step_2(monkeypatch)
    work = tmp_path / "nan"
    work.mkdir()
    cfg = run_toml(work, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=3, network_train_unet_only=True,
                   optimizer_type="AdamW8bit")
    with pytest.raises(UserError, match=r"not finite at step 2 \(epoch 1\): that optimizer step was skipped"):
        sdxl_train_network.main(["--config_file", cfg])
    logged = [json.loads(line)["step"] for line in (work / "run_loss.jsonl").read_text().splitlines()]
    assert logged == [1, 3]
    rescued = list((work / "out").glob("*interrupted*.safetensors"))
    assert rescued, sorted(p.name for p in (work / "out").iterdir())
    weights = load_file(str(rescued[0]))
    assert weights and all(torch.isfinite(t.float()).all() for t in weights.values())
