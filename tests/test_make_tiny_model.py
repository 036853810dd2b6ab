"""tools/make_tiny_model.py writes loadable tiny models; run as a user would (subprocess from another folder)."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from library.models.sdxl_loader import load_sdxl
from library.models.tiny import build_tiny_sdxl
from tools import make_tiny_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO_ROOT, "tools", "make_tiny_model.py")


def _run(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_writes_sdxl_single_file(tmp_path):
    out = tmp_path / "tiny.safetensors"
    result = _run("--family", "sdxl", "--output", str(out), "--seed", "3", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    loaded, reference = load_sdxl(str(out)), build_tiny_sdxl(seed=3)
    for part in ("unet", "vae", "text_encoder1", "text_encoder2"):
        ref = getattr(reference, part).state_dict()
        got = getattr(loaded, part).state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref), part


def test_cli_flux_writes_the_single_file_set(tmp_path):
    result = _run("--family", "flux", "--output", str(tmp_path / "flux"), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("flux.safetensors", "ae.safetensors", "clip_l.safetensors", "t5xxl.safetensors"):
        assert (tmp_path / "flux" / name).is_file(), name
    assert (tmp_path / "flux" / "tokenizer_2").is_dir()


def test_cli_rejects_unknown_family_and_format(tmp_path):
    result = _run("--family", "sd15", "--output", str(tmp_path / "x"), cwd=str(tmp_path))
    assert result.returncode != 0 and "--family" in result.stderr
    result = _run("--family", "sdxl", "--output", str(tmp_path / "x"), "--format", "ckpt", cwd=str(tmp_path))
    assert result.returncode != 0 and "--format" in result.stderr


def test_main_writes_diffusers_folder_with_same_weights(tmp_path):
    out = tmp_path / "folder"
    assert make_tiny_model.main(["--family", "sdxl", "--output", str(out), "--format", "diffusers", "--seed", "3"]) == 0
    assert (out / "model_index.json").is_file()
    loaded, reference = load_sdxl(str(out)), build_tiny_sdxl(seed=3)
    assert torch.equal(loaded.unet.conv_out.weight, reference.unet.conv_out.weight)
    assert torch.equal(loaded.text_encoder2.text_projection.weight, reference.text_encoder2.text_projection.weight)
