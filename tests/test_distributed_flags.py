"""sd-scripts' multi-process, DeepSpeed and machine flags on the trainers (issue #15): DDP options reach the
accelerator, DeepSpeed ZeRO-3 becomes FSDP sharding of the base model, a Hub --resume that cannot be downloaded stops
before training (the Hub flags themselves: test_hub_upload.py), and --v2 / --model_type /
--cpu_offload_checkpointing / --disable_mmap_load_safetensors do what they say."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, build_shapes_dataset, free_port, run_script
from test_flux_train import flux_toml
from test_train_sdxl_network import read_losses, run_toml

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- DDP: the accelerator's kwargs handlers ------------------------------------------------------------------------

def test_ddp_flags_become_the_accelerators_kwargs_handlers():
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from library.config.distributed_flags import DistributedConfig
    from library.train.scale_out import accelerator_kwargs_handlers

    assert accelerator_kwargs_handlers(DistributedConfig(), cuda=False) == []  # nothing given: accelerate's defaults
    init, ddp = accelerator_kwargs_handlers(DistributedConfig(ddp_timeout=7, ddp_gradient_as_bucket_view=True,
                                                              ddp_static_graph=True), cuda=False)
    assert isinstance(init, InitProcessGroupKwargs) and init.timeout == datetime.timedelta(minutes=7)
    # only the timeout reaches init_process_group: accelerate keeps choosing the backend (a named one would make a
    # single process wait for a group)
    assert init.to_kwargs() == {"timeout": datetime.timedelta(minutes=7)}
    # 10 minutes is accelerate's NCCL default, which it would not pass on to a gloo group (whose default is 30)
    (ten,) = accelerator_kwargs_handlers(DistributedConfig(ddp_timeout=10), cuda=False)
    assert abs(ten.to_kwargs()["timeout"] - datetime.timedelta(minutes=10)) < datetime.timedelta(milliseconds=1)
    assert isinstance(ddp, DistributedDataParallelKwargs)
    assert ddp.gradient_as_bucket_view and ddp.static_graph
    (only,) = accelerator_kwargs_handlers(DistributedConfig(ddp_static_graph=True), cuda=False)
    assert only.static_graph and not only.gradient_as_bucket_view


def test_the_accelerator_is_built_with_the_handlers():
    """What the Accelerator holds (in a fresh process: accelerate's state is a per-process singleton)."""
    code = """
from library.config.distributed_flags import DistributedConfig
from library.train.scale_out import accelerator_kwargs_handlers
from accelerate import Accelerator
acc = Accelerator(cpu=True, kwargs_handlers=accelerator_kwargs_handlers(
    DistributedConfig(ddp_timeout=3, ddp_static_graph=True), cuda=False))
print(acc.init_handler.timeout.total_seconds(), acc.ddp_handler.static_graph, acc.ddp_handler.gradient_as_bucket_view)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-3:] == ["180.0", "True", "False"]


# ---- DeepSpeed: stage 3 as FSDP sharding, the rest replicated -------------------------------------------------------

def _cfg(evaluates: bool = False, fp8: bool = False, **distributed):
    from library.config.distributed_flags import DistributedConfig

    return SimpleNamespace(distributed=DistributedConfig(**distributed),
                           model=SimpleNamespace(flux=SimpleNamespace(fp8_base=fp8, blocks_to_swap=None)),
                           validation=SimpleNamespace(evaluates=evaluates))


def test_deepspeed_zero3_maps_to_fsdp_sharding_of_the_base_model(capsys):
    from library.train.scale_out import ShardingOptions, deepspeed_sharding

    assert deepspeed_sharding(_cfg()) is None
    assert deepspeed_sharding(_cfg(zero_stage=3)) is None  # DeepSpeed options without --deepspeed: nothing
    for stage in (0, 1, 2):
        assert deepspeed_sharding(_cfg(deepspeed=True, zero_stage=stage)) is None
    assert deepspeed_sharding(_cfg(deepspeed=True, zero_stage=3)) == ShardingOptions(reshard_after_forward=True,
                                                                                     offload_params=False)
    assert deepspeed_sharding(_cfg(deepspeed=True, zero_stage=3, offload_param_device="cpu")).offload_params
    # a combination sharding cannot do: the base model stays whole, the run goes on, one warning says why
    assert deepspeed_sharding(_cfg(fp8=True, deepspeed=True, zero_stage=3)) is None
    err = capsys.readouterr().err
    assert "--deepspeed --zero_stage 3: the base model is not sharded" in err and "--fp8_base" in err


def test_deepspeed_warnings_say_what_happens_instead():
    from library.config.distributed_flags import distributed_warnings

    assert distributed_warnings({}) == []
    (w,) = distributed_warnings({"deepspeed": True, "zero_stage": 2})
    assert "DeepSpeed is not used" in w and "ZeRO-2" in w and "replicated" in w
    ws = distributed_warnings({"deepspeed": True, "zero_stage": 3, "offload_param_device": "nvme",
                               "zero3_init_flag": True, "offload_optimizer_device": "cpu"})
    assert any("sharded over the processes with FSDP" in w and "CPU memory" in w for w in ws)
    assert any(w.startswith("--offload_param_device nvme") for w in ws)
    assert any(w.startswith("--zero3_init_flag") for w in ws)
    assert any(w.startswith("--offload_optimizer_device") for w in ws)
    (w,) = distributed_warnings({"zero3_init_flag": True})
    assert "without --deepspeed have no effect" in w
    (w,) = distributed_warnings({"ddp_static_graph": True, "ddp_gradient_as_bucket_view": True})
    assert "--ddp_gradient_as_bucket_view / --ddp_static_graph" in w and "not wrapped in DDP" in w
    (w,) = distributed_warnings({"fp16_master_weights_and_gradients": True})
    assert "fp32 master weights" in w


# ---- Hub flags: uploads and --resume_from_huggingface are tested against a stand-in Hub in test_hub_upload.py ------

# ---- machine flags ---------------------------------------------------------------------------------------------

def test_cpu_offload_checkpointing_saves_block_inputs_through_save_on_cpu(monkeypatch):
    """The checkpointed block's inputs are what goes through save_on_cpu, and the gradients are unchanged."""
    from library.train import offload_checkpointing

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    packed: list[tuple[int, ...]] = []
    real = torch.autograd.graph.save_on_cpu

    class Recording(real):
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda"):
            super().__init__(pin_memory, device_type)
            inner = self.pack_hook

            def pack(t):
                packed.append(tuple(t.shape))
                return inner(t)
            self.pack_hook = pack

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    y = offload_checkpointing.offloading_checkpoint(block, x)
    assert packed == [(4, 8)]  # only the block's input is saved (the activations are recomputed)
    y.square().sum().backward()
    got = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    block(x).square().sum().backward()
    for a, b in zip(got, [p.grad for p in block.parameters()] + [x.grad]):
        torch.testing.assert_close(a, b)


def test_flux_transformer_blocks_checkpoint_with_their_inputs_offloaded(monkeypatch):
    """enable_checkpointing(cpu_offload=True) on the FLUX transformer: in training, each of its 4 blocks runs under
    save_on_cpu (its inputs go through the offload hooks) and the gradients equal plain checkpointing's."""
    from diffusers import FluxTransformer2DModel

    from library.models.tiny_flux import TINY_FLUX_TRANSFORMER
    from library.train.offload_checkpointing import enable_checkpointing

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER).train()
    inputs = dict(hidden_states=torch.randn(1, 16, 64, requires_grad=True), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]), return_dict=False)
    entered = []
    real = torch.autograd.graph.save_on_cpu

    def recording(*args, **kwargs):
        entered.append(1)
        return real(*args, **kwargs)

    grads = []
    for offload in (False, True):
        enable_checkpointing(model, cpu_offload=offload)
        monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", recording)
        model.zero_grad()
        inputs["hidden_states"].grad = None
        model(**inputs)[0].square().sum().backward()
        grads.append(inputs["hidden_states"].grad.clone())
        assert len(entered) == (4 if offload else 0)  # 2 double + 2 single blocks
    torch.testing.assert_close(grads[0], grads[1])


def test_safetensors_read_without_mmap_gives_the_same_tensors_and_metadata(tmp_path, monkeypatch):
    from library.models import single_file

    path = str(tmp_path / "m.safetensors")
    want = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    save_file(want, path, metadata={"k": "v"})
    mapped = single_file.read_single_file(path, allow_pickle=False)
    monkeypatch.setattr(single_file, "safe_open", None)  # the in-memory read must not memory-map the file
    single_file.set_safetensors_mmap(False)
    try:
        tensors, metadata = single_file.read_single_file(path, allow_pickle=False)
    finally:
        single_file.set_safetensors_mmap(True)
    assert metadata == mapped[1] == {"k": "v"}
    assert tensors.keys() == want.keys()
    for k in want:
        assert torch.equal(tensors[k], want[k])


def test_machine_flags_are_applied_before_the_run(monkeypatch):
    import argparse

    from library.errors import UserError
    from library.models import single_file
    from library.train.entry import apply_machine_flags

    monkeypatch.setitem(single_file._MMAP, "enabled", True)
    apply_machine_flags(argparse.Namespace(disable_mmap_load_safetensors=True), "sdxl")
    assert single_file._MMAP["enabled"] is False
    apply_machine_flags(argparse.Namespace(disable_mmap_load_safetensors=False), "sdxl")
    assert single_file._MMAP["enabled"] is True
    with pytest.raises(UserError, match="--cpu_offload_checkpointing cannot be combined with --blocks_to_swap"):
        apply_machine_flags(argparse.Namespace(cpu_offload_checkpointing=True, blocks_to_swap=4), "flux")


# ---- through the scripts -------------------------------------------------------------------------------------------

def _warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_sdxl_run_with_deepspeed_and_machine_flags_trains(tmp_path, tiny_sdxl_file):
    ds = build_shapes_dataset(tmp_path)
    cfg = run_toml(tmp_path, tiny_sdxl_file, ds["config"], network_train_unet_only=True, gradient_checkpointing=True)
    flags = ["--deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "cpu", "--ddp_timeout", "5",
             "--ddp_static_graph", "--fp16_master_weights_and_gradients",
             "--disable_mmap_load_safetensors", "--cpu_offload_checkpointing"]
    r = run_script("sdxl_train_network.py", "--config_file", cfg, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "lora.safetensors").is_file()
    assert len(read_losses(tmp_path / "run_loss.jsonl")) == 2
    warnings = _warning_lines(r.stderr)
    for start in ("--deepspeed --zero_stage 2: DeepSpeed is not used", "--ddp_static_graph: the network is not",
                  "--fp16_master_weights_and_gradients:",
                  "--offload_optimizer_device / "):
        assert sum(w.startswith("warning: " + start) for w in warnings) == 1, (start, warnings)
    assert "--cpu_offload_checkpointing: no CUDA GPU" in r.stderr or torch.cuda.is_available()


@pytest.mark.parametrize("args, message", [
    (["--v2"], "--v2: Stable Diffusion 2.x models are not SDXL models"),
    # offline (run_script sets HF_HUB_OFFLINE=1): the download fails before training, naming the location
    (["--resume_from_huggingface", "--resume", "me/lora/last-state:main:model"],
     "--resume_from_huggingface --resume me/lora/last-state:main:model: downloading the state failed"),
])
def test_sdxl_refusals_name_the_flag(tmp_path, args, message):
    r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", str(tmp_path / "none.safetensors"),
                   "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert message in r.stderr


def test_lllite_refuses_v2(tmp_path):
    r = run_script("sdxl_train_control_net_lllite.py", "--pretrained_model_name_or_path", "x.safetensors",
                   "--train_data_dir", str(tmp_path), "--v2")
    assert r.returncode == 1 and "--v2: Stable Diffusion 2.x" in r.stderr and "Traceback" not in r.stderr


def test_flux_model_type_chroma_and_unknown_are_refused(tmp_path):
    r = run_script("flux_train_network.py", "--pretrained_model_name_or_path", "x.safetensors",
                   "--train_data_dir", str(tmp_path), "--model_type", "chroma")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--model_type chroma: only FLUX.1 models" in r.stderr
    r = run_script("flux_train_network.py", "--model_type", "sd3")
    assert r.returncode != 0 and "sd3" in r.stderr and "--model_type" in r.stderr


def test_flux_v2_and_controlnet_path_are_ignored_with_a_warning_and_train(tmp_path, tiny_flux_single):
    ds = build_shapes_dataset(tmp_path)
    cfg = flux_toml(tmp_path, tiny_flux_single, ds["config"], network_train_unet_only=True, model_type="flux",
                    v2=True, controlnet_model_name_or_path="controlnet.safetensors", gradient_checkpointing=True,
                    cpu_offload_checkpointing=True)
    r = run_script("flux_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "lora.safetensors").is_file()
    warnings = _warning_lines(r.stderr)
    assert sum(w.startswith("warning: --v2: an SD 2.x flag") for w in warnings) == 1
    assert sum(w.startswith("warning: --controlnet_model_name_or_path:") for w in warnings) == 1


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_torchrun_with_ddp_flags_and_zero3_shards_the_flux_transformer(tmp_path, tiny_flux_single):
    """Two processes with sd-scripts' DDP flags and --deepspeed --zero_stage 3: the process group forms with them,
    the frozen transformer is sharded (FSDP) and the LoRA is saved once."""
    ds = build_shapes_dataset(tmp_path)
    cfg = flux_toml(tmp_path, tiny_flux_single, ds["config"], network_train_unet_only=True, mixed_precision="no",
                    timestep_sampling="sigmoid", ddp_timeout=3, ddp_gradient_as_bucket_view=True,
                    ddp_static_graph=True, deepspeed=True, zero_stage=3)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(REPO / "flux_train_network.py"),
                        "--config_file", cfg], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "FSDP: the frozen transformer is sharded" in out and "over 2 processes" in out
    assert "--deepspeed --zero_stage 3: DeepSpeed is not used" in out
    assert len(read_losses(tmp_path / "run_loss.jsonl")) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lora.safetensors"]

