"""FLUX --cache_text_encoder_outputs with a CLIP-L LoRA: sd-scripts' partial caching (T5 cached, CLIP-L live).

fluxgym passes --cache_text_encoder_outputs without --network_train_unet_only; sd-scripts then caches T5's outputs
and runs CLIP-L every step, so its LoRA trains. The run must equal an uncached one, and a partial cache must never
stand in for a full one (or the other way round).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import build_shapes_dataset, run_script  # noqa: E402
from test_flux_train import flux_toml, read_losses  # noqa: E402

from library.cache.provenance import text_identity  # noqa: E402
from library.cache.storage import read_metadata  # noqa: E402
from library.cache.text_outputs import TextOutputCache  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.train.text_cache_plan import TextCachePlan, plan_text_cache  # noqa: E402

FLUX_OUTPUTS = (("pooled",), ("t5", "t5_mask"))


def _train(tmp_path: Path, model: str, dataset: str, name: str, *flags: str) -> tuple[list[float], dict, str]:
    cfg = flux_toml(tmp_path, model, dataset, name=name, output_name=name, max_train_steps=2)
    r = run_script("flux_train_network.py", "--config_file", cfg, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_losses(tmp_path / f"{name}_loss.jsonl"), load_file(str(tmp_path / "out" / f"{name}.safetensors")), \
        r.stderr


def _te1(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("lora_te1_")}


def test_partial_cache_trains_clip_l_and_equals_the_uncached_run(tmp_path, tiny_flux_single):
    ds = build_shapes_dataset(tmp_path)
    te_dir = tmp_path / "te_cache"
    plain, plain_sd, _ = _train(tmp_path, tiny_flux_single, ds["config"], "plain")
    memory, memory_sd, _ = _train(tmp_path, tiny_flux_single, ds["config"], "memory", "--cache_text_encoder_outputs")
    disk, disk_sd, _ = _train(tmp_path, tiny_flux_single, ds["config"], "disk", "--cache_text_encoder_outputs",
                              "--cache_text_encoder_outputs_to_disk", "--text_encoder_cache_dir", str(te_dir))
    assert len(plain) == 2 and all(math.isfinite(v) for v in plain)
    for got in (memory, disk):
        for a, b in zip(got, plain, strict=True):
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (got, plain)
    te1 = _te1(memory_sd)
    assert te1 and set(te1) == set(_te1(plain_sd)) == set(_te1(disk_sd))
    # lora_up starts at zero: a nonzero one is a CLIP-L LoRA weight that the cached run trained
    assert any(float(v.abs().max()) > 0 for k, v in te1.items() if k.endswith("lora_up.weight"))
    for k, v in te1.items():
        assert torch.allclose(v, plain_sd[k], rtol=1e-4, atol=1e-6), k
        assert torch.allclose(v, disk_sd[k], rtol=1e-4, atol=1e-6), k
    # the disk cache holds T5's outputs only, and says it is partial
    files = sorted(te_dir.glob("*.te.safetensors"))
    assert files
    for f in files:
        with safe_open(str(f), "pt") as h:
            assert sorted(h.keys()) == ["t5", "t5_mask"]
        assert read_metadata(str(f))["outputs"] == "partial:t5+t5_mask"

    # a full-cache run (transformer only) over the same folder does not read those files: it writes its own
    full, _, _ = _train(tmp_path, tiny_flux_single, ds["config"], "full", "--cache_text_encoder_outputs_to_disk",
                        "--text_encoder_cache_dir", str(te_dir), "--network_train_unet_only")
    assert all(math.isfinite(v) for v in full)
    full_files = sorted(set(te_dir.glob("*.te.safetensors")) - set(files))
    assert len(full_files) == len(files)
    for f in full_files:
        with safe_open(str(f), "pt") as h:
            assert sorted(h.keys()) == ["pooled", "t5", "t5_mask"]
        assert "outputs" not in read_metadata(str(f))


def _fake_encoder(keys: tuple[str, ...]):
    calls: list[list[str]] = []

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        calls.append(list(captions))
        n = torch.tensor([float(len(c)) for c in captions])
        return {k: n[:, None] + i for i, k in enumerate(keys)}

    return encode, calls


def test_partial_and_full_caches_never_stand_in_for_each_other(tmp_path):
    folder = str(tmp_path / "te")
    base_id = "flux-te-abc"
    partial_id = text_identity(base_id, [], [], ("t5", "t5_mask"))
    full_id = text_identity(base_id, [], [])
    assert partial_id != full_id and "partial:t5+t5_mask" in partial_id
    partial = TextOutputCache(partial_id, "disk", folder, outputs=("t5_mask", "t5"), live_encoders=(0,))
    encode_partial, _ = _fake_encoder(("t5", "t5_mask"))
    assert partial.ensure(["a cat"], encode_partial, 4, progress=False) == 1
    full = TextOutputCache(full_id, "disk", folder)
    encode_full, calls = _fake_encoder(("pooled", "t5", "t5_mask"))
    assert full.path_for("a cat") != partial.path_for("a cat")
    assert full.ensure(["a cat"], encode_full, 4, progress=False) == 1 and calls == [["a cat"]]
    # even a file copied under the other's name is refused by its metadata, and re-encoded
    shutil.copy(partial.path_for("a cat"), full.path_for("a cat"))
    assert full.ensure(["a cat"], encode_full, 4, progress=False) == 1
    assert sorted(full.get("a cat")) == ["pooled", "t5", "t5_mask"]
    shutil.copy(full.path_for("a cat"), partial.path_for("a cat"))
    assert partial.ensure(["a cat"], encode_partial, 4, progress=False) == 1
    assert sorted(partial.get("a cat")) == ["t5", "t5_mask"]
    # a partial cache refuses outputs other than the ones it is for
    with pytest.raises(ValueError, match="partial"):
        TextOutputCache(partial_id, "memory", outputs=("t5", "t5_mask")).ensure(["x"], encode_full, 4,
                                                                                progress=False)
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp")]


def test_plan_text_cache(capsys):
    assert plan_text_cache(False, [True, False], FLUX_OUTPUTS) is None
    assert plan_text_cache(True, [False, False], FLUX_OUTPUTS) == TextCachePlan(outputs=None)
    assert plan_text_cache(True, [True, False], FLUX_OUTPUTS) == TextCachePlan(("t5", "t5_mask"), (0,))
    # train_t5xxl: nothing of T5 can be cached; sd-scripts stops, here every output is encoded every step
    assert plan_text_cache(True, [True, True], FLUX_OUTPUTS) is None
    assert "train_t5xxl" in capsys.readouterr().err
    # SDXL: both CLIPs feed the same hidden states, so a trained text encoder rules the cache out (as sd-scripts)
    with pytest.raises(UserError, match="--network_train_unet_only"):
        plan_text_cache(True, [True, True], ())


def test_train_t5xxl_with_cache_warns_and_trains_both_encoders(tmp_path, tiny_flux_single):
    ds = build_shapes_dataset(tmp_path)
    losses, sd, err = _train(tmp_path, tiny_flux_single, ds["config"], "t5", "--cache_text_encoder_outputs",
                             "--network_args", "train_t5xxl=True")
    assert "no text-encoder output can be cached" in err and all(math.isfinite(v) for v in losses)
    for prefix in ("lora_te1_", "lora_te3_"):
        assert any(float(v.abs().max()) > 0 for k, v in sd.items()
                   if k.startswith(prefix) and k.endswith("lora_up.weight")), prefix



def test_sdxl_with_a_text_encoder_lora_still_refuses_the_cache(tmp_path, tiny_sdxl_file):
    """SDXL's two CLIPs feed one hidden state: nothing can be cached while either is trained (sd-scripts asserts)."""
    from test_train_sdxl_network import run_toml

    ds = build_shapes_dataset(tmp_path)
    r = run_script("sdxl_train_network.py", "--config_file", run_toml(tmp_path, tiny_sdxl_file, ds["config"]),
                   "--cache_text_encoder_outputs")
    assert r.returncode != 0
    assert "--cache_text_encoder_outputs needs --network_train_unet_only" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "lora.safetensors").exists()
