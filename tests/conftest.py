"""Shared fixtures: tiny SDXL and FLUX models in both on-disk formats and small generated datasets, built once per
session; small helpers the tests share."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_sdxl_file(tmp_path_factory) -> str:
    from library.models.tiny import save_tiny_sdxl

    path = tmp_path_factory.mktemp("models") / "tiny_sdxl.safetensors"
    save_tiny_sdxl(str(path), "single_file", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory) -> str:
    from library.models.tiny import save_tiny_sdxl

    path = tmp_path_factory.mktemp("models") / "tiny_sdxl_diffusers"
    save_tiny_sdxl(str(path), "diffusers", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_flux_single(tmp_path_factory) -> str:
    """The tiny FLUX as users pass it: a folder of BFL-layout single files (+ tokenizers)."""
    from library.models.tiny_flux import save_tiny_flux

    return save_tiny_flux(str(tmp_path_factory.mktemp("flux") / "single"), "single_file", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_diffusers(tmp_path_factory) -> str:
    from library.models.tiny_flux import save_tiny_flux

    return save_tiny_flux(str(tmp_path_factory.mktemp("flux") / "diffusers"), "diffusers", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded (thread hand-offs dominate, worse on a busy 2-core machine). Request
    it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_lora_up(network, seed: int, scale: float) -> None:
    """Random nonzero `up` weights (a fresh LoRA's are zero), so that the network changes the model's output."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * scale)


def flux_lora_model(tiny, fp8: bool = False) -> tuple:
    """A frozen copy of the tiny FLUX transformer (optionally fp8 Linears) with a LoRA on it whose up weights are
    random and nonzero, in training mode with gradient checkpointing: what the block-swap tests step."""
    import copy

    import torch

    from library.models.lowvram import apply_fp8_linear
    from networks.lora_flux import create_network

    tr = copy.deepcopy(tiny.transformer).requires_grad_(False)
    if fp8:
        apply_fp8_linear(tr, torch.float32)
    net = create_network(1.0, 4, 4.0, tiny.ae, [tiny.clip_l, tiny.t5], tr)
    net.apply_to([tiny.clip_l, tiny.t5], tr, apply_text_encoder=False, apply_unet=True)
    randomize_lora_up(net, seed=5, scale=0.1)
    tr.enable_gradient_checkpointing()
    tr.train()
    return tr, net


def save_random_lora(network, path: Path, seed: int = 3, scale: float = 0.5) -> str:
    """Save `network` after randomize_lora_up: a LoRA file that visibly changes what the model generates."""
    randomize_lora_up(network, seed=seed, scale=scale)
    network.save_weights(str(path))
    return str(path)


def free_port() -> int:
    """A TCP port nobody listens on now, for torchrun's rendezvous: a fixed port fails the test whenever something
    else holds it (another run on the machine, a previous test's socket in TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_toml(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# aspect-ratio buckets from 32 to 128 pixels, the [general] keys of several tests' dataset configs
BUCKETING = {"enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32}


def write_dataset_toml(path: Path, *datasets: dict, general: dict | None = None) -> str:
    """Write an sd-scripts dataset config: each dataset a dict of its keys plus `subsets` (a list of dicts)."""
    from library.config.toml_write import dumps_dataset_config

    return write_toml(path, dumps_dataset_config({"general": general, "datasets": list(datasets)}))


def run_script(script: str, *args: str, cwd: str | Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a repo script as users do: a subprocess with the repo's Python."""
    cmd = [sys.executable, str(REPO / script), *args]
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, cwd=str(cwd or REPO), env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def shapes_dataset(tmp_path) -> dict:
    """A 4-image dataset of two aspect ratios, with conditioning images, and its TOML config."""
    return build_shapes_dataset(tmp_path)


def build_shapes_dataset(tmp_path: Path) -> dict:
    from library.data.synthetic import make_shapes_dataset

    img = tmp_path / "images"
    cond = tmp_path / "cond"
    make_shapes_dataset(str(img), 4, sizes=[(64, 64), (96, 64)], seed=0, conditioning_dir=str(cond))
    cfg = write_dataset_toml(tmp_path / "dataset.toml", {"resolution": 64, "batch_size": 2, "subsets": [
        {"image_dir": str(img), "num_repeats": 1}]}, general={"caption_extension": ".txt", **BUCKETING})
    cn_cfg = write_dataset_toml(tmp_path / "dataset_cn.toml", {"resolution": 64, "batch_size": 2, "subsets": [
        {"image_dir": str(img), "conditioning_data_dir": str(cond)}]}, general={"caption_extension": ".txt"})
    return {"image_dir": str(img), "cond_dir": str(cond), "config": cfg, "cn_config": cn_cfg, "root": tmp_path}
