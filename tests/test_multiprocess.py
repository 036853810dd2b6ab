"""Multi-process training (torchrun, gloo on CPU): N processes x batch b train like 1 process x batch N*b."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port, run_script, write_toml
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
    "flux_lora": ("flux_train_network.py", _flux_run, "tiny_flux_single", {}),
}


# The equivalence runs train with plain SGD and no gradient clipping: each update is lr x the averaged gradient, so
# float-level differences in the gradient (a batch of 4 vs two batches of 2 reduce in another order) stay float-level
# in the weights, and a gradient of the wrong scale shows. Adam moves every weight by about lr x sign(gradient) on its
# first step: a near-zero gradient whose sign flips with the summation order becomes a full-step difference, which
# made a weight comparison after Adam steps flaky.
EQUIVALENCE = dict(optimizer_type="SGD", learning_rate=0.05, max_grad_norm=0.0)
LOSS_TOLERANCE = dict(rel=1e-4, abs=1e-6)  # fp32 losses of the same samples, noise and weights


def assert_same_updates(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                        start: dict[str, torch.Tensor]) -> None:
    """Two networks trained from `start` made the same updates, up to float error. The tolerance is relative to the
    largest update anywhere in the network: float error in a sum of gradient terms is about 1e-6 of the terms
    (measured: below 4e-6), so 1e-3 leaves a wide margin, while a real difference (a gradient not averaged over the
    processes, a sample trained twice or skipped) changes updates by tens of percent."""
    assert got.keys() == want.keys() == start.keys()
    want_update = {k: want[k].double() - start[k].double() for k in want}
    scale = max(float(u.abs().max()) for u in want_update.values())
    assert scale > 0, "the reference run did not change the network"
    for k, u in want_update.items():
        torch.testing.assert_close(got[k].double() - start[k].double(), u, rtol=1e-3, atol=1e-3 * scale,
                                   msg=lambda m: f"{k}: {m}")


def assert_pickle_free(state_dir: Path) -> None:
    names = sorted(p.name for p in state_dir.iterdir())
    assert not [n for n in names if n.endswith((".pkl", ".bin", ".pt", ".pth"))], names


def _initial_network(tmp_path, script: str, make_run, model, values: dict) -> dict[str, torch.Tensor]:
    """The network before any step (0 steps: the run saves what it built from the seed)."""
    values = {k: v for k, v in values.items() if v is not None}
    cfg = make_run(tmp_path, model, _dataset(tmp_path, 4), "start", **dict(values, save_state=False))
    r = run_script(script, "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(tmp_path / "start" / "lora.safetensors"))


def _torchrun(tmp_path, script: str, cfg: str) -> subprocess.CompletedProcess:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(REPO / script),
                           "--config_file", cfg], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, trainer, request):
    script, make_run, model_fixture, extra = TRAINERS[trainer]
    model = request.getfixturevalue(model_fixture)
    common = dict(max_train_steps=3, save_state=True, **EQUIVALENCE, **extra)
    start = _initial_network(tmp_path, script, make_run, model, dict(common, max_train_steps=0))
    one = make_run(tmp_path, model, _dataset(tmp_path, 4), "one", **common)
    r = run_script(script, "--config_file", one)
    assert r.returncode == 0, r.stderr[-3000:]

    two = make_run(tmp_path, model, _dataset(tmp_path, 2), "two", **common)
    r = _torchrun(tmp_path, script, two)
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout + r.stderr
    assert "2 per device x 2 process(es)" in out
    assert "Traceback" not in out

    # the same samples, noise and gradients: the same losses and the same network, up to float error
    assert read_losses(tmp_path / "two_loss.jsonl") == pytest.approx(read_losses(tmp_path / "one_loss.jsonl"),
                                                                      **LOSS_TOLERANCE)
    a = load_file(str(tmp_path / "one" / "lora.safetensors"))
    b = load_file(str(tmp_path / "two" / "lora.safetensors"))
    assert_same_updates(b, a, start)
    # the state folder holds the same network
    assert load_file(str(tmp_path / "two" / "lora-state" / "network.safetensors")).keys() == b.keys()
    # only the main process wrote: one loss line per step, one set of files; each process its own RNG state
    assert len(read_losses(tmp_path / "two_loss.jsonl")) == 3
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["lora-state", "lora.safetensors"]
    state_dir = tmp_path / "two" / "lora-state"
    assert json.loads((state_dir / "loop_state.json").read_text())["num_processes"] == 2
    assert (state_dir / "rng-0.json").is_file() and (state_dir / "rng-1.json").is_file()
    assert_pickle_free(state_dir)

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
        r = _torchrun(tmp_path, "sdxl_train_network.py", cfg)
        assert r.returncode == 0, (i, r.stderr[-3000:])
        assert "Traceback" not in r.stderr


def _accelerate_env(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file F` gives each process (accelerate's own launch code): on
    these machines accelerate launch starts multi-CPU runs only through MPI, so torchrun starts the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_fsdp_config_shards_the_flux_transformer_and_trains_like_one_process(tmp_path, tiny_flux_single):
    """The shipped FSDP config: each process holds half the frozen transformer, and the LoRA (replicated) comes out
    as from one process with twice the batch, saved once in the kohya layout."""
    env = _accelerate_env(REPO / "configs" / "accelerate" / "fsdp_flux_lora.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    common = dict(max_train_steps=3, mixed_precision="no", save_state=True, **EQUIVALENCE,
                  sample_prompts=str(write_toml(tmp_path / "prompts.txt", "a red circle --w 64 --h 64 --s 2 --d 5\n")),
                  sample_every_n_steps=3)
    start = _initial_network(tmp_path, "flux_train_network.py", _flux_run, tiny_flux_single,
                             dict(common, max_train_steps=0, sample_prompts=None))
    one = _flux_run(tmp_path, tiny_flux_single, _dataset(tmp_path, 4), "one", **common)
    r = run_script("flux_train_network.py", "--config_file", one)
    assert r.returncode == 0, r.stderr[-3000:]

    two = _flux_run(tmp_path, tiny_flux_single, _dataset(tmp_path, 2), "two", **common)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                        str(REPO / "flux_train_network.py"), "--config_file", two], cwd=str(tmp_path),
                       env=dict(os.environ, **env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                                TOKENIZERS_PARALLELISM="false"),
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "sharded in 4 blocks + root over 2 processes (50% held here)" in out
    assert read_losses(tmp_path / "two_loss.jsonl") == pytest.approx(read_losses(tmp_path / "one_loss.jsonl"),
                                                                      **LOSS_TOLERANCE)
    a = load_file(str(tmp_path / "one" / "lora.safetensors"))
    b = load_file(str(tmp_path / "two" / "lora.safetensors"))
    assert all(k.startswith("lora_unet_") for k in b if not k.endswith("alpha"))
    assert_same_updates(b, a, start)
    assert_pickle_free(tmp_path / "two" / "lora-state")
    # sampling ran on both processes (the sharded forward needs them) and the main one wrote the image once
    assert [p.name for p in (tmp_path / "two" / "sample").iterdir()] == \
        [p.name for p in (tmp_path / "one" / "sample").iterdir()]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["lora-state", "lora.safetensors", "sample"]


def test_deepspeed_and_incompatible_fsdp_requests_are_clear():
    from library.config.flux_config import FluxConfig
    from library.errors import UserError
    from library.train.scale_out import ShardingOptions, check_sharding_compatible, take_sharding_request

    with pytest.raises(UserError, match="DeepSpeed is not supported.*fsdp_flux_lora.yaml"):
        take_sharding_request({"ACCELERATE_USE_DEEPSPEED": "true"})
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "FSDP_OFFLOAD_PARAMS": "true",
           "OTHER": "x"}
    assert take_sharding_request(env) == ShardingOptions(reshard_after_forward=False, offload_params=True)
    assert env == {"OTHER": "x"}  # taken out of accelerate's view
    assert take_sharding_request({}) is None
    cfg = SimpleNamespace(model=SimpleNamespace(flux=FluxConfig(blocks_to_swap=2)),
                          validation=SimpleNamespace(evaluates=False))
    with pytest.raises(UserError, match="cannot be combined with --fp8_base or --blocks_to_swap"):
        check_sharding_compatible(ShardingOptions(), cfg)
