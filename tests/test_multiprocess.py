"""Multi-process training (torchrun, gloo on CPU): N processes x batch b train like 1 process x batch N*b."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script, write_toml
from test_train_sdxl_network import read_losses, run_toml


def test_local_slices_partition_the_global_batch():
    from library.train.data_setup import local_slice

    for n in range(0, 9):
        batch = tuple(range(100, 100 + n))
        for world in (1, 2, 3):
            parts = [local_slice(batch, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(batch)  # disjoint, complete, in order
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _dataset(tmp_path, batch_size: int) -> str:
    from library.data.synthetic import make_shapes_dataset

    img, cond = tmp_path / "images", tmp_path / "cond"
    if not img.exists():
        make_shapes_dataset(str(img), 8, sizes=[(64, 64)], seed=3, conditioning_dir=str(cond))
    return write_toml(tmp_path / f"ds_b{batch_size}.toml", f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = {batch_size}
  [[datasets.subsets]]
  image_dir = '{img}'
  conditioning_data_dir = '{cond}'
""")


def _sdxl_run(tmp_path, model, ds, name, **extra):
    return run_toml(tmp_path, model, ds, name=name, output_dir=str(tmp_path / name), network_train_unet_only=True,
                    **extra)


def _flux_run(tmp_path, model, ds, name, **extra):
    from test_flux_train import flux_toml

    return flux_toml(tmp_path, model, ds, name=name, output_dir=str(tmp_path / name), network_train_unet_only=True,
                     timestep_sampling="sigmoid", **extra)


TRAINERS = {
    # script, run-config builder, model fixture, extra values
    "sdxl_lora": ("sdxl_train_network.py", _sdxl_run, "tiny_sdxl_file", {}),
    "sdxl_lllite": ("sdxl_train_control_net_lllite.py", _sdxl_run, "tiny_sdxl_file",
                    {"network_module": "networks.control_net_lllite", "network_dim": 8, "cond_emb_dim": 8}),
    "flux_lora": ("flux_train_network.py", _flux_run, "tiny_flux_model", {}),
}


@pytest.fixture(scope="module")
def tiny_flux_model(tmp_path_factory) -> str:
    from library.models.tiny_flux import save_tiny_flux

    return save_tiny_flux(str(tmp_path_factory.mktemp("flux") / "single"), "single_file", seed=0)


def _torchrun(tmp_path, script: str, cfg: str, port: int) -> subprocess.CompletedProcess:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(REPO / script),
                           "--config_file", cfg], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, trainer, request):
    script, make_run, model_fixture, extra = TRAINERS[trainer]
    model = request.getfixturevalue(model_fixture)
    common = dict(max_train_steps=3, learning_rate=1e-3, save_state=True, **extra)
    one = make_run(tmp_path, model, _dataset(tmp_path, 4), "one", **common)
    r = run_script(script, "--config_file", one)
    assert r.returncode == 0, r.stderr[-3000:]

    two = make_run(tmp_path, model, _dataset(tmp_path, 2), "two", **common)
    r = _torchrun(tmp_path, script, two, 29517 + list(TRAINERS).index(trainer))
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout + r.stderr
    assert "2 per device x 2 process(es)" in out
    assert "Traceback" not in out

    # the same samples, noise and gradients: the same losses and the same network, up to float error
    assert read_losses(tmp_path / "two_loss.jsonl") == pytest.approx(read_losses(tmp_path / "one_loss.jsonl"),
                                                                      rel=1e-4, abs=1e-6)
    a = load_file(str(tmp_path / "one" / "lora.safetensors"))
    b = load_file(str(tmp_path / "two" / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # Adam divides by sqrt(v): float-level gradient differences (different reduction order) show up as ~1e-5
        # absolute in the weights, 1% of one step's update at lr 1e-3
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-5)
    # only the main process wrote: one loss line per step, one set of files
    assert len(read_losses(tmp_path / "two_loss.jsonl")) == 3
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["lora-state", "lora.safetensors"]
    state = json.loads((tmp_path / "two" / "lora-state" / "loop_state.json").read_text())
    assert state["num_processes"] == 2

    if trainer == "sdxl_lora":
        # resuming a 2-process state with 1 process is refused with a clear message
        r = run_script(script, "--config_file", two, "--resume", str(tmp_path / "two" / "lora-state"),
                       "--max_train_steps", "4")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "2 process(es)" in r.stderr and "same number of processes" in r.stderr


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_repeated_two_process_runs_exit_cleanly(tmp_path, tiny_sdxl_file):
    """No flaky abort or hang at exit: five 2-process runs in a row all exit 0 (the process group is destroyed)."""
    ds = _dataset(tmp_path, 2)
    for i in range(5):
        cfg = _sdxl_run(tmp_path, tiny_sdxl_file, ds, f"rep{i}", max_train_steps=1)
        r = _torchrun(tmp_path, "sdxl_train_network.py", cfg, 29541 + i)
        assert r.returncode == 0, (i, r.stderr[-3000:])
        assert "Traceback" not in r.stderr
