"""Training state folders never run code, and --resume refuses a state that does not fit the run, clearly.

Driven through sdxl_train_network.py as users drive it. One 5-step run (state saved at step 3) is shared by the
module; each test resumes from (a copy of) its state folder.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, build_shapes_dataset, run_script
from test_train_sdxl_network import read_losses, run_toml

SCRIPT = "sdxl_train_network.py"
COMMON = dict(network_train_unet_only=True, save_every_n_steps=3, save_state=True, max_train_steps=5)
PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")


class _CreatesMarker:
    """A hostile pickle: unpickling it opens (so creates) the marker file, as any code could run there."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_hostile_pickles(folder: Path, marker: Path) -> None:
    """accelerate's old state files, each one a pickle that runs code when loaded."""
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
        (folder / name).write_bytes(pickle.dumps(_CreatesMarker(marker)))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_sdxl_file) -> dict:
    """5 steps in one run, with the state saved after step 3."""
    root = tmp_path_factory.mktemp("state_safety")
    ds = build_shapes_dataset(root)
    cfg = run_toml(root, tiny_sdxl_file, ds["config"], name="full", output_dir=str(root / "full"), **COMMON)
    r = run_script(SCRIPT, "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "dataset": ds, "state": root / "full" / "lora-step00000003-state",
            "losses": read_losses(root / "full_loss.jsonl"),
            "weights": load_file(str(root / "full" / "lora.safetensors"))}


def resume(tmp_path: Path, model: str, full_run: dict, state: Path, *extra_args: str, name: str = "resumed",
           **changes) -> subprocess.CompletedProcess:
    values = dict(COMMON, **changes)
    values.setdefault("dataset_config", full_run["dataset"]["config"])
    ds = values.pop("dataset_config")
    cfg = run_toml(tmp_path, model, ds, name=name, output_dir=str(tmp_path / name), resume=str(state), **values)
    return run_script(SCRIPT, "--config_file", cfg, *extra_args)


def assert_continues_exactly(tmp_path: Path, full_run: dict, name: str = "resumed") -> None:
    """3 + 2 steps == 5 steps: the last two losses and the final weights."""
    losses = read_losses(tmp_path / f"{name}_loss.jsonl")
    assert losses == pytest.approx(full_run["losses"][3:], rel=1e-4, abs=1e-6)
    got = load_file(str(tmp_path / name / "lora.safetensors"))
    assert got.keys() == full_run["weights"].keys()
    for k, want in full_run["weights"].items():
        torch.testing.assert_close(got[k], want, rtol=1e-4, atol=1e-6)


def assert_refused(r: subprocess.CompletedProcess, *phrases: str) -> None:
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for phrase in phrases:
        assert phrase in r.stderr, r.stderr[-3000:]


# --- the file format -------------------------------------------------------------------------------------------------

def test_tree_round_trip_keeps_types_and_refuses_what_json_cannot_hold(tmp_path):
    from library.errors import UserError
    from library.train import state_io

    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).reshape(2, 3)}},
            "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0], "foreach": None, "eps": math.inf,
                              "__odd": "x", "dtype": torch.bfloat16}]}
    state_io.write_tree(str(tmp_path), "optimizer", tree)
    back = state_io.read_tree(str(tmp_path), "optimizer")
    assert list(back["state"]) == [0] and back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["param_groups"][0]["eps"] == math.inf and back["param_groups"][0]["__odd"] == "x"
    assert back["param_groups"][0]["dtype"] is torch.bfloat16
    torch.testing.assert_close(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    with pytest.raises(UserError, match=r"cannot save the scheduler state without pickle: .*lambda.*function"):
        state_io.write_tree(str(tmp_path), "scheduler", {"lambda": lambda step: 1.0})


def test_fp16_loss_scaler_state_round_trips_as_json_numbers(tmp_path):
    from library.train import state_io

    saved = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    state_io.write_tree(str(tmp_path), "scaler", saved.state_dict())
    assert json.loads((tmp_path / "scaler.json").read_text())["scale"] == 1024.0
    loaded = torch.amp.GradScaler("cpu")
    loaded.load_state_dict(state_io.read_tree(str(tmp_path), "scaler"))
    assert (loaded.get_scale(), loaded.get_growth_interval()) == (1024.0, 7)


def test_rng_state_round_trips_through_the_files(tmp_path):
    import random

    import numpy as np

    from library.train import state_io

    state_io.write_tree(str(tmp_path), "rng-0", state_io.rng_state())
    want = (torch.rand(3), random.random(), np.random.rand())
    state_io.set_rng_state(state_io.read_tree(str(tmp_path), "rng-0"))
    got = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], want[0])
    assert got[1:] == want[1:]


def _fake_session(seed: int = 1):
    """The parts of a training session that checkpoint.save_state / load_state touch, on a small linear network."""
    from types import SimpleNamespace

    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, scaler=None,
                                  wait_for_everyone=lambda: None, print=print)
    cfg = SimpleNamespace(network_kind="lora", training=SimpleNamespace(seed=1, gradient_accumulation_steps=1),
                          network=SimpleNamespace(network_dim=4, network_alpha=1.0),
                          optimizer=SimpleNamespace(optimizer_type="AdamW", optimizer_args=[], learning_rate=0.1),
                          model=SimpleNamespace(allow_pickle=False))
    return SimpleNamespace(cfg=cfg, accelerator=accelerator, network=SimpleNamespace(module=module),
                           optimizer=optimizer, scheduler=scheduler, datasets=[], batches_per_epoch=2)


def _step(session) -> None:
    session.network.module(torch.ones(1, 3)).sum().backward()
    session.optimizer.step()
    session.optimizer.zero_grad()
    session.scheduler.step()


def test_save_and_load_restore_network_optimizer_and_scheduler_in_process(tmp_path):
    from library.train import checkpoint as ckpt

    a = _fake_session()
    _step(a)
    ckpt.save_state(a, ckpt.LoopState(global_step=1, batches_per_epoch=2, seed=1), str(tmp_path / "state"))
    _step(a)  # the run goes on ...
    b = _fake_session(seed=2)  # ... and a fresh one resumes from step 1
    assert ckpt.load_state(b, str(tmp_path / "state")).global_step == 1
    _step(b)
    for p, q in zip(a.network.module.parameters(), b.network.module.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_save_keeps_the_previous_state_folder(tmp_path, monkeypatch):
    from library.train import checkpoint as ckpt

    s = _fake_session()
    _step(s)
    path = str(tmp_path / "state")
    ckpt.save_state(s, ckpt.LoopState(global_step=1), path)
    monkeypatch.setattr(s.scheduler, "state_dict", lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_state(s, ckpt.LoopState(global_step=2), path)
    assert json.loads((tmp_path / "state" / "loop_state.json").read_text())["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no .tmp left behind
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        ckpt.save_state(s, ckpt.LoopState(global_step=2), str(tmp_path / "file" / "state"))


# --- saving and resuming through the script ----------------------------------------------------------------------------

def test_saved_state_is_pickle_free_and_describes_its_run(full_run):
    names = sorted(p.name for p in full_run["state"].iterdir())
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)], names
    for part in ("network.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
                 "rng-0.json", "rng-0.safetensors", "loop_state.json", "state.json"):
        assert part in names, names
    meta = json.loads((full_run["state"] / "state.json").read_text())
    depends = meta["depends"]
    assert depends["num_processes"] == 1 and depends["network"]["flags"]["network_dim"] == 4
    assert depends["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    assert len(depends["datasets"]) == 1 and len(depends["datasets"][0]["fingerprint"]) == 64
    loop = json.loads((full_run["state"] / "loop_state.json").read_text())
    assert loop["global_step"] == 3


def test_resume_continues_exactly_and_never_opens_planted_pickles(tmp_path, tiny_sdxl_file, full_run):
    """A pickle-format file dropped into a state folder is never read: the resume runs, and runs exactly."""
    state = tmp_path / "state"
    shutil.copytree(full_run["state"], state)
    marker = tmp_path / "code_ran"
    plant_hostile_pickles(state, marker)
    r = resume(tmp_path, tiny_sdxl_file, full_run, state)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not marker.exists()
    assert "resumed from" in r.stdout + r.stderr and "at step 3" in r.stdout + r.stderr
    assert_continues_exactly(tmp_path, full_run)
    final_state = json.loads((tmp_path / "resumed" / "lora-state" / "loop_state.json").read_text())
    assert final_state["global_step"] == 5


def test_hostile_old_format_state_is_refused_without_running_code(tmp_path, tiny_sdxl_file, full_run):
    marker = tmp_path / "code_ran"
    pickle.loads(pickle.dumps(_CreatesMarker(tmp_path / "proof")))  # the planted files do run code when unpickled
    assert (tmp_path / "proof").exists()
    state = tmp_path / "old-state"
    state.mkdir()
    shutil.copy(full_run["state"] / "loop_state.json", state)
    plant_hostile_pickles(state, marker)
    r = resume(tmp_path, tiny_sdxl_file, full_run, state)
    assert_refused(r, "old pickle format", "--allow_pickle", "runs any code")
    assert not marker.exists()


_WRITE_OLD_FORMAT = """
import shutil, sys
import torch
from accelerate import Accelerator
from library.train import state_io

src, dst = sys.argv[1], sys.argv[2]
network = dict(state_io.read_tensors(src + "/network.safetensors"))
optimizer_state = state_io.read_tree(src, "optimizer")
scheduler_state = state_io.read_tree(src, "scheduler")


class Holder:
    # what the old trainer registered for checkpointing: accelerate pickles state_dict()
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


# an optimizer with the same parameter groups as the trained one (shapes from its moments)
groups = [{"params": [torch.nn.Parameter(torch.zeros_like(optimizer_state["state"][i]["exp_avg"]))
                      for i in g["params"]]} for g in optimizer_state["param_groups"]]
optimizer = torch.optim.AdamW(groups)
optimizer.load_state_dict(optimizer_state)
accelerator = Accelerator(cpu=True)
optimizer = accelerator.prepare(optimizer)
accelerator.register_for_checkpointing(Holder(network), Holder(scheduler_state))
accelerator.save_state(dst)
shutil.copy(src + "/loop_state.json", dst)
"""


def test_old_accelerate_format_loads_only_with_allow_pickle(tmp_path, tiny_sdxl_file, full_run):
    """A state folder as earlier versions wrote it (accelerate's save_state) still resumes exactly, opted in."""
    old = tmp_path / "old-state"
    r = subprocess.run([sys.executable, "-c", _WRITE_OLD_FORMAT, str(full_run["state"]), str(old)], cwd=str(REPO),
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in old.iterdir())
    assert "optimizer.bin" in names and "custom_checkpoint_0.pkl" in names and "state.json" not in names, names

    refused = resume(tmp_path, tiny_sdxl_file, full_run, old, name="refused")
    assert_refused(refused, "old pickle format", "optimizer.bin", "--allow_pickle")

    r = resume(tmp_path, tiny_sdxl_file, full_run, old, "--allow_pickle")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loading the pickled state folder" in r.stdout + r.stderr
    assert_continues_exactly(tmp_path, full_run)
    # what it saves from then on is the pickle-free format
    names = sorted(p.name for p in (tmp_path / "resumed" / "lora-state").iterdir())
    assert "state.json" in names and not [n for n in names if n.endswith(PICKLE_SUFFIXES)], names


def _renamed_image_dataset(tmp_path: Path, full_run: dict) -> str:
    """The same images (same sizes, so the same batch count) with one file renamed."""
    src = Path(full_run["dataset"]["image_dir"])
    images = tmp_path / "images"
    shutil.copytree(src, images)
    first = sorted(p for p in images.iterdir() if p.suffix == ".png")[0]
    first.rename(first.with_name("renamed" + first.suffix))
    caption = first.with_suffix(".txt")
    if caption.exists():
        caption.rename(caption.with_name("renamed.txt"))
    text = Path(full_run["dataset"]["config"]).read_text().replace(str(src), str(images))
    out = tmp_path / "dataset.toml"
    out.write_text(text)
    return str(out)


@pytest.mark.parametrize("change, expected", [
    ("network_dim", "--network_dim 4 then, 8 now"),
    ("optimizer", "optimizer AdamW then, SGD now"),
    ("dataset", "the dataset changed: datasets[0]: the same counts, but other images"),
    ("seed", "--seed 1 then, 2 now"),
])
def test_resume_into_a_different_run_is_refused_naming_the_change(tmp_path, tiny_sdxl_file, full_run, change,
                                                                  expected):
    if change == "dataset":
        changes = {"dataset_config": _renamed_image_dataset(tmp_path, full_run)}
    else:
        changes = {"network_dim": dict(network_dim=8), "optimizer": dict(optimizer_type="SGD"),
                   "seed": dict(seed=2)}[change]
    r = resume(tmp_path, tiny_sdxl_file, full_run, full_run["state"], **changes)
    assert_refused(r, "the state was saved by a run that differs from this one", expected)
    assert not (tmp_path / "resumed" / "lora.safetensors").exists()
