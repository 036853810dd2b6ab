"""--fused_backward_pass (library/train/fused_backward.py): stepping each parameter inside the backward pass gives the
same weights as the usual step after it, for the per-parameter optimizers; sd-scripts' rules (no gradient
accumulation; optimizers that pool statistics refused); the cases that fall back to the usual step say so."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script
from test_train_sdxl_network import run_toml

from library.config import environment_flags
from library.config.optimizer_flags import OptimizerConfig
from library.errors import UserError
from library.train.fused_backward import FusedBackward, attach_fused_backward, check_fused_backward
from library.train.optim import build_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _groups(model: torch.nn.Module) -> list[dict]:
    # two groups with different learning rates, as a LoRA's U-Net / text-encoder groups
    return [{"params": list(model[0].parameters()), "lr": 1e-2}, {"params": list(model[2].parameters()), "lr": 3e-2}]


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(optimizer_type: str, args: list[str], fused: bool, max_grad_norm: float = 0.0, steps: int = 3):
    model = _model()
    cfg = OptimizerConfig(optimizer_type=optimizer_type, optimizer_args=args, learning_rate=1e-2)
    opt = build_optimizer(_groups(model), cfg)
    hooks = FusedBackward(opt, max_grad_norm).attach() if fused else None
    for step in range(steps):
        _loss(model, step).backward()
        if not fused and max_grad_norm:
            for p in model.parameters():  # sd-scripts' fused rule: each tensor clipped on its own
                torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
        opt.step()  # with the hooks: no gradient left, so nothing changes
        opt.zero_grad(set_to_none=True)
        if fused:
            assert all(p.grad is None for p in model.parameters())  # freed inside the backward
    if hooks is not None:
        hooks.remove()
    return model, opt


@pytest.mark.parametrize("optimizer_type, args", [
    ("SGD", ["momentum=0.9"]),
    ("AdamW", ["weight_decay=0.01"]),
    ("Adafactor", ["relative_step=False", "scale_parameter=False", "warmup_init=False"]),
    ("Adafactor", []),  # relative step: its own step size from each parameter's state
])
def test_fused_steps_give_the_same_weights(optimizer_type, args):
    plain, plain_opt = _train(optimizer_type, args, fused=False)
    fused, fused_opt = _train(optimizer_type, args, fused=True)
    before = _model()
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), before.parameters()))  # it trained
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the optimizer state is the same too (what --save_state writes and --resume reads)
    sa, sb = plain_opt.state_dict()["state"], fused_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()


def test_max_grad_norm_clips_each_parameter_on_its_own():
    plain, _ = _train("SGD", [], fused=False, max_grad_norm=0.05)
    fused, _ = _train("SGD", [], fused=True, max_grad_norm=0.05)
    unclipped, _ = _train("SGD", [], fused=False)
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(fused.parameters(), unclipped.parameters()))


def test_a_non_finite_gradient_stops_the_backward():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    FusedBackward(opt, 0.0).attach()
    with pytest.raises(UserError, match="gradient is not finite"):
        (_loss(model, 0) * float("inf")).backward()


def _cfg(**kw) -> SimpleNamespace:
    opt = dict(fused_backward_pass=True, optimizer_type="AdamW", use_8bit_adam=False, use_lion_optimizer=False,
               max_grad_norm=1.0)
    opt.update({k: v for k, v in kw.items() if k != "gradient_accumulation_steps"})
    return SimpleNamespace(optimizer=SimpleNamespace(**opt),
                           training=SimpleNamespace(gradient_accumulation_steps=kw.get("gradient_accumulation_steps", 1)))


def test_sd_scripts_rules_are_checked_before_training():
    check_fused_backward(_cfg())
    check_fused_backward(_cfg(optimizer_type="Adafactor"))
    with pytest.raises(UserError, match="--gradient_accumulation_steps 1"):
        check_fused_backward(_cfg(gradient_accumulation_steps=2))
    for name in ("Prodigy", "DAdaptAdam", "AdamWScheduleFree", "mymodule.MyOptimizer"):
        with pytest.raises(UserError, match=f"--optimizer_type {name}: its step is not per parameter"):
            check_fused_backward(_cfg(optimizer_type=name))
    check_fused_backward(_cfg(fused_backward_pass=False, optimizer_type="Prodigy"))  # off: no rule


def test_fp16_scaling_and_several_processes_step_as_usual_with_one_warning(capsys, monkeypatch):
    monkeypatch.setattr(environment_flags, "_SAID", set())
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert attach_fused_backward(opt, _cfg(), SimpleNamespace(scaler=object(), num_processes=1)) is None
    assert attach_fused_backward(opt, _cfg(), SimpleNamespace(scaler=None, num_processes=2)) is None
    err = capsys.readouterr().err
    assert "fp16 loss scaling" in err and "several processes" in err
    hooks = attach_fused_backward(opt, _cfg(), SimpleNamespace(scaler=None, num_processes=1))
    assert hooks is not None and len(hooks.handles) == 4 and hooks.max_grad_norm == 1.0
    hooks.remove()


def test_script_with_fused_backward_pass_saves_the_same_network(tmp_path, tiny_sdxl_file, shapes_dataset):
    """The issue's check through sdxl_train_network.py: 2 Adafactor steps with and without the flag."""
    common = dict(optimizer_type="Adafactor", max_grad_norm=0.0, network_train_unet_only=True,
                  optimizer_args=["relative_step=False", "scale_parameter=False", "warmup_init=False"])
    saved = {}
    for name, extra in (("plain", []), ("fused", ["--fused_backward_pass"])):
        cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], name=name,
                       output_dir=str(tmp_path / name), **common)
        r = run_script("sdxl_train_network.py", "--config_file", cfg, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("parameters step during the backward pass" in r.stdout) == (name == "fused")
        saved[name] = load_file(str(tmp_path / name / "lora.safetensors"))
    assert saved["plain"].keys() == saved["fused"].keys()
    assert any(float(v.abs().max()) > 0 for k, v in saved["fused"].items() if k.endswith("lora_up.weight"))
    for k, v in saved["plain"].items():
        torch.testing.assert_close(saved["fused"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    # sd-scripts' rule through the script: no gradient accumulation
    r = run_script("sdxl_train_network.py", "--config_file", cfg, "--fused_backward_pass",
                   "--gradient_accumulation_steps", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--gradient_accumulation_steps 1" in r.stderr



def test_a_fused_torch_optimizer_skips_the_parameter_with_a_non_finite_gradient():
    """torch's fused AdamW (the CUDA default here) reads `found_inf`: the bad parameter keeps its weights, the
    others step, and the backward's flag waits on the device for the loop (no read at the end of the backward)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    hooks = FusedBackward(opt, 0.0, device_skip=True).attach()
    _loss(model, 1).backward()
    assert float(hooks.take_flag()) == 0.0 and hooks.take_flag() is None
    before = [p.detach().clone() for p in model.parameters()]
    handle = model[0].weight.register_hook(lambda g: g * float("nan"))
    _loss(model, 0).backward()  # no error here: the loop reads the flag with the step's loss
    after = list(model.parameters())
    assert torch.equal(after[0], before[0])  # skipped on the device
    assert all(not torch.equal(a, b) for a, b in zip(after[1:], before[1:]))  # the others stepped
    assert not hasattr(opt, "found_inf")
    assert float(hooks.take_flag()) == 1.0
    handle.remove()
    hooks.remove()


def test_script_stops_at_the_next_read_after_a_skipped_fused_backward_step(tmp_path, tiny_sdxl_file, shapes_dataset,
                                                                         monkeypatch):
    """Through sdxl_train_network.py: --fused_backward_pass with fused AdamW and a NaN gradient at step 2. The run
    stops at the loss read (the end here) with the step named; steps 1 and 3 are logged."""
    import json

    import sdxl_train_network
    from test_noise_and_optim import nan_gradient_at_step_2

    nan_gradient_at_step_2(monkeypatch)
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=3, max_grad_norm=0.0,
                   network_train_unet_only=True, optimizer_args=["fused=True"], fused_backward_pass=True)
    with pytest.raises(UserError, match=r"not finite at step 2 \(epoch 1\): with --fused_backward_pass, the "
                                        r"parameters whose gradient was not finite skipped that step"):
        sdxl_train_network.main(["--config_file", cfg])
    logged = [json.loads(line)["step"] for line in (tmp_path / "run_loss.jsonl").read_text().splitlines()]
    assert logged == [1, 3]
