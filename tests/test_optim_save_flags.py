"""sd-scripts' optimizer, schedule, saving and logging flags (issue #15): unit tests of each rule, and a few short
runs of sdxl_train_network.py on the tiny model that show the flag changes what it should."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_script
from safetensors import safe_open
from test_train_sdxl_network import run_toml

from library.config.train_config import OptimizerConfig
from library.errors import ConfigError, UserError
from library.train.initial_step import StartPosition, start_position
from library.train.optim import (
    build_optimizer,
    build_scheduler,
    optimizer_name,
    set_schedule_free_mode,
)
from library.train.retention import (
    epoch_to_remove,
    every_n_epochs_from_ratio,
    remove_path,
    state_window,
    step_to_remove,
)


def _params() -> list[dict]:
    torch.manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(8, 8))]}]


def _step(opt, sched=None, steps: int = 2) -> None:
    w = opt.param_groups[0]["params"][0]
    for _ in range(steps):
        (w ** 2).sum().backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


# ---- optimizers ------------------------------------------------------------------------------------------------

ALL_TYPES = {  # sd-scripts' documented names -> the class that must come out
    "AdamW": "AdamW", "AdamW8bit": "AdamW8bit", "PagedAdamW": "PagedAdamW", "PagedAdamW8bit": "PagedAdamW8bit",
    "PagedAdamW32bit": "PagedAdamW32bit", "Lion": "Lion", "Lion8bit": "Lion8bit", "PagedLion8bit": "PagedLion8bit",
    "SGDNesterov": "SGD", "SGDNesterov8bit": "SGD8bit", "Prodigy": "Prodigy", "Adafactor": "Adafactor",
    "AdamWScheduleFree": "AdamWScheduleFree", "RAdamScheduleFree": "RAdamScheduleFree",
    "DAdaptation": "DAdaptAdamPreprint", "DAdaptAdam": "DAdaptAdam", "DAdaptAdaGrad": "DAdaptAdaGrad",
    "DAdaptAdan": "DAdaptAdan", "DAdaptAdanIP": "DAdaptAdanIP", "DAdaptLion": "DAdaptLion", "DAdaptSGD": "DAdaptSGD",
    "RMSprop": "RMSprop", "torch.optim.Adagrad": "Adagrad",
}


@pytest.mark.parametrize("name", sorted(ALL_TYPES))
def test_every_optimizer_type_builds_and_steps(name):
    if name.startswith("DAdapt"):
        pytest.importorskip("dadaptation")
    cfg = OptimizerConfig(optimizer_type=name, learning_rate=1.0 if name.startswith(("DAdapt", "Prodigy")) else 1e-3)
    opt = build_optimizer(_params(), cfg)
    assert type(opt).__name__ == ALL_TYPES[name]
    sched = build_scheduler(opt, cfg, 10)
    before = opt.param_groups[0]["params"][0].detach().clone()
    _step(opt, sched, steps=3)
    assert torch.isfinite(opt.param_groups[0]["params"][0]).all()
    if name not in ("RAdamScheduleFree", "DAdaptSGD"):  # RAdam's first steps and DAdaptSGD's d0 are (near) zero
        assert not torch.equal(before, opt.param_groups[0]["params"][0].detach())


def test_nesterov_gets_sd_scripts_default_momentum():
    opt = build_optimizer(_params(), OptimizerConfig(optimizer_type="SGDNesterov"))
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9
    opt = build_optimizer(_params(), OptimizerConfig(optimizer_type="SGDNesterov", optimizer_args=["momentum=0.5"]))
    assert opt.param_groups[0]["momentum"] == 0.5


def test_old_spellings():
    assert optimizer_name(OptimizerConfig(use_8bit_adam=True)) == "AdamW8bit"
    assert optimizer_name(OptimizerConfig(use_lion_optimizer=True)) == "Lion"
    assert optimizer_name(OptimizerConfig(optimizer_type="")) == "AdamW"
    assert type(build_optimizer(_params(), OptimizerConfig(use_8bit_adam=True))).__name__ == "AdamW8bit"
    with pytest.raises(UserError, match="both given"):
        optimizer_name(OptimizerConfig(use_8bit_adam=True, use_lion_optimizer=True))
    with pytest.raises(UserError, match="old spelling"):
        optimizer_name(OptimizerConfig(use_8bit_adam=True, optimizer_type="Prodigy"))


def test_missing_optional_package_names_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dadaptation", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install dadaptation"):
        build_optimizer(_params(), OptimizerConfig(optimizer_type="DAdaptAdam", learning_rate=1.0))
    monkeypatch.setitem(sys.modules, "schedulefree", None)
    with pytest.raises(UserError, match="pip install schedulefree"):
        build_optimizer(_params(), OptimizerConfig(optimizer_type="AdamWScheduleFree"))


def test_adafactor_relative_step_as_sd_scripts():
    """relative_step defaults to True: no fixed lr, and the adafactor schedule reports the step size it computes."""
    from transformers.optimization import AdafactorSchedule

    cfg = OptimizerConfig(optimizer_type="Adafactor", learning_rate=1e-3)
    opt = build_optimizer(_params(), cfg)
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    sched = build_scheduler(opt, cfg, 10)
    assert isinstance(sched, AdafactorSchedule)
    _step(opt, sched)
    assert sched.get_last_lr()[0] > 0
    # relative_step=False: a plain learning rate and the usual schedules
    cfg = OptimizerConfig(optimizer_type="Adafactor", learning_rate=1e-3, optimizer_args=["relative_step=False"],
                          lr_scheduler="linear")
    opt = build_optimizer(_params(), cfg)
    assert opt.defaults["lr"] == 1e-3 and not isinstance(build_scheduler(opt, cfg, 10), AdafactorSchedule)
    # warmup_init forces relative_step, as sd-scripts does
    cfg = OptimizerConfig(optimizer_type="Adafactor", optimizer_args=["relative_step=False", "warmup_init=True"])
    assert build_optimizer(_params(), cfg).defaults["relative_step"] is True
    with pytest.raises(UserError, match="needs --optimizer_type Adafactor"):
        build_scheduler(build_optimizer(_params(), OptimizerConfig()), OptimizerConfig(lr_scheduler="adafactor"), 10)


def test_schedule_free_modes_and_constant_schedule():
    cfg = OptimizerConfig(optimizer_type="AdamWScheduleFree", learning_rate=1e-2, lr_scheduler="cosine")
    opt = build_optimizer(_params(), cfg)
    assert opt.param_groups[0]["train_mode"] is True  # ready to step
    sched = build_scheduler(opt, cfg, 10)
    _step(opt, sched, 3)
    assert sched.get_last_lr() == [1e-2]  # no outer schedule: the optimizer schedules itself
    w = opt.param_groups[0]["params"][0]
    train_weights = w.detach().clone()
    set_schedule_free_mode(opt, train=False)
    assert opt.param_groups[0]["train_mode"] is False and not torch.equal(train_weights, w.detach())
    set_schedule_free_mode(opt, train=True)
    assert torch.allclose(train_weights, w.detach(), atol=1e-6)
    plain = build_optimizer(_params(), OptimizerConfig())
    set_schedule_free_mode(plain, train=False)  # other optimizers are left alone


# ---- schedules -------------------------------------------------------------------------------------------------

def _lrs(cfg: OptimizerConfig, total: int) -> list[float]:
    opt = build_optimizer(_params(), cfg)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_cosine_with_min_lr_formula():
    total, warmup, ratio = 20, 4, 0.1
    lrs = _lrs(OptimizerConfig(learning_rate=1.0, lr_scheduler="cosine_with_min_lr", lr_warmup_steps=warmup,
                               lr_scheduler_min_lr_ratio=ratio), total)
    for s, lr in enumerate(lrs):
        if s < warmup:
            want = s / warmup
        else:  # one half cosine (num_cycles 1 -> 0.5 cycles) from 1 down to the floor
            p = (s - warmup) / (total - warmup)
            want = ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * p))
        assert lr == pytest.approx(want, abs=1e-6), s
    with pytest.raises(UserError, match="lr_scheduler_min_lr_ratio"):
        _lrs(OptimizerConfig(lr_scheduler="cosine_with_min_lr"), 5)


def test_warmup_stable_decay_formula():
    total, warmup, decay = 20, 2, 0.25  # decay as a fraction of the run: 5 steps
    lrs = _lrs(OptimizerConfig(learning_rate=1.0, lr_scheduler="warmup_stable_decay", lr_warmup_steps=warmup,
                               lr_decay_steps=decay, lr_scheduler_min_lr_ratio=0.2), total)
    d = int(decay * total)
    stable = total - warmup - d
    for s, lr in enumerate(lrs):
        if s < warmup:  # warm-up rises from the floor too
            want = 0.2 + 0.8 * s / warmup
        elif s < warmup + stable:
            want = 1.0
        else:
            p = (s - warmup - stable) / d
            want = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p))
        assert lr == pytest.approx(want, abs=1e-6), s
    with pytest.raises(UserError, match="exceed"):
        _lrs(OptimizerConfig(lr_scheduler="warmup_stable_decay", lr_warmup_steps=4, lr_decay_steps=4), 6)


def test_inverse_sqrt_with_timescale():
    lrs = _lrs(OptimizerConfig(learning_rate=1.0, lr_scheduler="inverse_sqrt", lr_warmup_steps=2,
                               lr_scheduler_timescale=5), 12)
    for s, lr in enumerate(lrs):
        want = s / 2 if s < 2 else 1 / math.sqrt((s - 2 + 5) / 5)
        assert lr == pytest.approx(want, abs=1e-6), s


def test_polynomial_power_and_restarts_cycles():
    lrs = _lrs(OptimizerConfig(learning_rate=1.0, lr_scheduler="polynomial", lr_scheduler_power=2.0), 10)
    for s, lr in enumerate(lrs):  # diffusers/transformers' polynomial decays to lr_end 1e-7
        assert lr == pytest.approx((1 - 1e-7) * (1 - s / 10) ** 2 + 1e-7, abs=1e-6)
    lrs = _lrs(OptimizerConfig(learning_rate=1.0, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2), 10)
    assert lrs[0] == pytest.approx(1.0) and lrs[5] == pytest.approx(1.0)  # restarts at the half-way step


def test_piecewise_constant_and_scheduler_type():
    lrs = _lrs(OptimizerConfig(learning_rate=1.0, lr_scheduler="piecewise_constant",
                               lr_scheduler_args=['step_rules="1:3,0.5:6,0.1"']), 8)
    assert lrs == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.1, 0.1])
    with pytest.raises(UserError, match="step_rules"):
        _lrs(OptimizerConfig(lr_scheduler="piecewise_constant"), 4)
    lrs = _lrs(OptimizerConfig(learning_rate=1.0, lr_scheduler="cosine", lr_scheduler_type="StepLR",
                               lr_scheduler_args=["step_size=2", "gamma=0.5"]), 6)
    assert lrs == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])  # --lr_scheduler_type wins over --lr_scheduler
    lrs = _lrs(OptimizerConfig(learning_rate=1.0, lr_scheduler_type="torch.optim.lr_scheduler.ExponentialLR",
                               lr_scheduler_args=["gamma=0.5"]), 3)
    assert lrs == pytest.approx([1, 0.5, 0.25])
    with pytest.raises(UserError, match="warm-up"):
        _lrs(OptimizerConfig(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2"], lr_warmup_steps=2), 4)
    with pytest.raises(UserError, match="cannot import"):
        _lrs(OptimizerConfig(lr_scheduler_type="NoSuchLR"), 4)
    with pytest.raises(UserError, match="unknown --lr_scheduler"):
        _lrs(OptimizerConfig(lr_scheduler="cosinus"), 4)


# ---- retention and start position --------------------------------------------------------------------------------

def test_retention_follows_sd_scripts_arithmetic():
    # every 2 epochs, keep 3: saving epoch 8 removes epoch 2
    assert epoch_to_remove(8, 2, 3) == 2 and epoch_to_remove(6, 2, 3) is None and epoch_to_remove(8, 2, None) is None
    # every 10 steps, keep 30 steps: saving step 50 removes step 10 (sd-scripts' own example)
    assert step_to_remove(50, 10, 30) == 10 and step_to_remove(40, 10, 30) is None
    assert step_to_remove(45, 5, 12) == 30  # 45 - 12 - 1 = 32, down to a multiple of 5
    assert state_window(None, 3) == 3 and state_window(1, 3) == 1
    assert every_n_epochs_from_ratio(10, 5, 7) == 2 and every_n_epochs_from_ratio(3, 5, None) == 1
    assert every_n_epochs_from_ratio(10, None, 7) == 7


def test_remove_path(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "f").write_text("x")
    assert remove_path(str(tmp_path / "a.safetensors")) and remove_path(str(tmp_path / "s"))
    assert not remove_path(str(tmp_path / "missing")) and list(tmp_path.iterdir()) == []


def test_start_position():
    assert start_position(None, None, False, 5, 1, 20) is None
    assert start_position(3, None, False, 5, 1, 20) == StartPosition(0, 2, 0)  # epoch numbering only
    assert start_position(3, None, True, 5, 2, 20) == StartPosition(10, 2, 0)
    assert start_position(None, 7, True, 5, 2, 20) == StartPosition(7, 1, 4)  # 2 steps x 2 micro-batches in
    with pytest.raises(UserError, match="not below"):
        start_position(None, 20, True, 5, 1, 20)
    with pytest.raises(UserError, match="count from 1"):
        start_position(0, None, False, 5, 1, 20)


# ---- trackers ----------------------------------------------------------------------------------------------------

def test_tracker_init_arguments(tmp_path):
    from types import SimpleNamespace

    from library.train.trackers import logged_config, project_name, tracker_init_kwargs

    log = SimpleNamespace(log_config=False, log_tracker_name=None, log_prefix=None, log_tracker_config=None,
                          wandb_run_name=None, wandb_api_key="secret")
    cfg = SimpleNamespace(log=log)
    assert project_name(cfg) == "network_train" and tracker_init_kwargs(cfg) == {} and logged_config(cfg) is None
    log.log_prefix = "pre"
    assert project_name(cfg) == "pre"
    log.log_tracker_name = "proj"
    assert project_name(cfg) == "proj"
    log.wandb_run_name = "run-1"
    assert tracker_init_kwargs(cfg) == {"wandb": {"name": "run-1"}}
    toml_file = tmp_path / "trackers.toml"
    toml_file.write_text('[wandb]\nentity = "me"\ntags = ["a"]\n')
    log.log_tracker_config = str(toml_file)
    assert tracker_init_kwargs(cfg) == {"wandb": {"entity": "me", "tags": ["a"]}}  # replaces the run name
    toml_file.write_text("name = 'x'\n")
    with pytest.raises(ConfigError, match="table named after a tracker"):
        tracker_init_kwargs(cfg)
    log.log_tracker_config = str(tmp_path / "missing.toml")
    with pytest.raises(UserError, match="cannot read"):
        tracker_init_kwargs(cfg)


def test_logged_config_drops_secrets_and_paths():
    from dataclasses import dataclass

    from library.config.log_flags import LogConfig
    from library.config.save_flags import SaveConfig
    from library.train.trackers import logged_config

    @dataclass
    class Cfg:
        log: LogConfig
        save: SaveConfig
        family: str = "sdxl"

    cfg = Cfg(LogConfig(log_config=True, wandb_api_key="secret", logging_dir="/home/me/logs"),
              SaveConfig(output_dir="/home/me/out", save_last_n_steps=3))
    out = logged_config(cfg)
    assert "wandb_api_key" not in out and "output_dir" not in out and "logging_dir" not in out
    assert out["save_last_n_steps"] == 3 and out["family"] == "sdxl"
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in out.values())


# ---- runs through sdxl_train_network.py --------------------------------------------------------------------------

def _steps_logged(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_run_step_retention_and_metadata(tmp_path, tiny_sdxl_file, shapes_dataset):
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG\r\n\x1a\n")
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=5, save_every_n_steps=1,
                   save_last_n_steps=2, save_state=True, save_last_n_steps_state=1, optimizer_type="",
                   use_8bit_adam=True, lr_scheduler="warmup_stable_decay", lr_warmup_steps=1, lr_decay_steps=0.5,
                   lr_scheduler_min_lr_ratio=0.1, metadata_title="Shapes", metadata_author="me",
                   metadata_description="tiny", metadata_license="MIT", metadata_tags="a,b",
                   metadata_trigger_phrase="sks", metadata_usage_hint="use sks", metadata_thumbnail=str(thumb))
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    # step saves at 1..4 (5 is the final file). Files keep a 2-step window: saving 4 removed 1 (4 - 2 - 1)
    assert "lora-step00000001.safetensors" not in names
    assert {f"lora-step{s:08d}.safetensors" for s in (2, 3, 4)} | {"lora.safetensors"} <= names
    # states keep a 1-step window: saving 3 removed 1, saving 4 removed 2; the final state is kept
    assert {n for n in names if n.endswith("-state")} == {"lora-step00000003-state", "lora-step00000004-state",
                                                          "lora-state"}
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["modelspec.title"] == "Shapes" and md["modelspec.author"] == "me"
    assert md["modelspec.description"] == "tiny" and md["modelspec.license"] == "MIT"
    assert md["modelspec.tags"] == "a,b" and md["modelspec.trigger_phrase"] == "sks"
    assert md["modelspec.usage_hint"] == "use sks"
    assert md["modelspec.thumbnail"].startswith("data:image/png;base64,")
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.sai_model_spec"] == "1.0.1" and md["modelspec.prediction_type"] == "epsilon"
    assert "x" in md["modelspec.resolution"] and md["ss_optimizer"].endswith(".AdamW8bit")  # --use_8bit_adam


def test_run_epoch_retention_initial_step_and_schedule_free(tmp_path, tiny_sdxl_file, shapes_dataset):
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_epochs=3,
                   save_every_n_epochs=1, save_last_n_epochs=1, optimizer_type="AdamWScheduleFree",
                   no_metadata=True)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["lora-000002.safetensors", "lora.safetensors"], names  # epoch 1 removed when 2 was saved
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    # --no_metadata: sd-scripts' minimum keys only (what a loader needs), and the model card
    assert {k for k in md if k.startswith("ss_")} == {"ss_v2", "ss_base_model_version", "ss_network_module",
                                                      "ss_network_dim", "ss_network_alpha"}
    assert md["modelspec.title"] == "lora"

    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], name="skip", max_train_steps=4,
                   initial_step=2, skip_until_initial_step=True, output_dir=str(tmp_path / "out2"))
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps_logged(tmp_path / "skip_loss.jsonl") == [3, 4]


def test_run_bad_scheduler_is_one_clear_error(tmp_path, tiny_sdxl_file, shapes_dataset):
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], lr_scheduler="cosine_with_min_lr")
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode != 0 and "--lr_scheduler_min_lr_ratio" in r.stderr and "Traceback" not in r.stderr


def test_schedule_free_state_round_trip_continues_exactly(tmp_path):
    """A --save_state folder keeps a schedule-free optimizer in train mode with the weights it steps on: restoring
    weights and optimizer state (pickle-free, as library/train/checkpoint.py does) continues exactly."""
    from library.train import state_io

    cfg = OptimizerConfig(optimizer_type="AdamWScheduleFree", learning_rate=1e-2)
    straight = build_optimizer(_params(), cfg)
    _step(straight, steps=3)
    resumed_from = build_optimizer(_params(), cfg)
    _step(resumed_from, steps=2)
    state_io.write_tree(str(tmp_path), "optimizer", resumed_from.state_dict())
    weights = resumed_from.param_groups[0]["params"][0].detach().clone()

    params = _params()
    with torch.no_grad():
        params[0]["params"][0].copy_(weights)
    fresh = build_optimizer(params, cfg)
    fresh.load_state_dict(state_io.read_tree(str(tmp_path), "optimizer"))
    set_schedule_free_mode(fresh, train=True)
    _step(fresh, steps=1)
    assert torch.allclose(fresh.param_groups[0]["params"][0], straight.param_groups[0]["params"][0], atol=1e-7)
