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

    img = tmp_path / "images"
    if not img.exists():
        make_shapes_dataset(str(img), 8, sizes=[(64, 64)], seed=3)
    return write_toml(tmp_path / f"ds_b{batch_size}.toml", f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = {batch_size}
  [[datasets.subsets]]
  image_dir = '{img}'
""")


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_sdxl_file):
    common = dict(network_train_unet_only=True, max_train_steps=3, learning_rate=1e-3, save_state=True)
    one = run_toml(tmp_path, tiny_sdxl_file, _dataset(tmp_path, 4), name="one", output_dir=str(tmp_path / "one"),
                   **common)
    r = run_script("sdxl_train_network.py", "--config_file", one)
    assert r.returncode == 0, r.stderr[-3000:]

    two = run_toml(tmp_path, tiny_sdxl_file, _dataset(tmp_path, 2), name="two", output_dir=str(tmp_path / "two"),
                   **common)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(REPO / "sdxl_train_network.py"),
                        "--config_file", two], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout + r.stderr
    assert "2 per device x 2 process(es)" in out
    assert "Traceback" not in out

    # the same samples, noise and gradients: the same losses and the same LoRA, up to float error
    assert read_losses(tmp_path / "two_loss.jsonl") == pytest.approx(read_losses(tmp_path / "one_loss.jsonl"),
                                                                      rel=1e-4, abs=1e-6)
    a = load_file(str(tmp_path / "one" / "lora.safetensors"))
    b = load_file(str(tmp_path / "two" / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # Adam divides by sqrt(v): float-level gradient differences (different reduction order) show up as ~1e-5
        # absolute in the weights, 1% of one step's update at lr 1e-3
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-5)
    # only the main process wrote: one loss line per step
    assert len(read_losses(tmp_path / "two_loss.jsonl")) == 3
    state = json.loads((tmp_path / "two" / "lora-state" / "loop_state.json").read_text())
    assert state["num_processes"] == 2

    # resuming a 2-process state with 1 process is refused with a clear message
    r = run_script("sdxl_train_network.py", "--config_file", two, "--resume", str(tmp_path / "two" / "lora-state"),
                   "--max_train_steps", "4")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "2 process(es)" in r.stderr and "same number of processes" in r.stderr
