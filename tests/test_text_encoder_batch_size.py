"""--text_encoder_batch_size (sd-scripts' FLUX flag): captions per text-encoder batch while the outputs are cached.
The batch size changes how the cache is filled, never what is in it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_shapes_dataset, run_script
from test_flux_train import flux_toml

pytestmark = pytest.mark.usefixtures("one_thread")


def _cache(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*.te.safetensors"))}


def test_caching_with_batch_size_1_and_3_gives_identical_caches(tmp_path, tiny_flux_single):
    ds = build_shapes_dataset(tmp_path)  # 4 images, 4 different captions
    caches, bars = {}, {}
    for size in (1, 3):
        cfg = flux_toml(tmp_path, tiny_flux_single, ds["config"], name=f"b{size}", max_train_steps=1,
                        output_dir=str(tmp_path / f"out{size}"), network_train_unet_only=True,
                        cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=True,
                        text_encoder_cache_dir=str(tmp_path / f"te{size}"))
        r = run_script("flux_train_network.py", "--config_file", cfg, "--text_encoder_batch_size", str(size))
        assert r.returncode == 0, r.stderr[-3000:]
        caches[size] = _cache(tmp_path / f"te{size}")
        bars[size] = re.findall(r"caching text encoder outputs: 100%[^\n\r]*?(\d+)/(\d+)", r.stderr)
    # the flag sets the batches: 4 captions in 4 batches of 1, or in 2 batches (3 + 1)
    assert bars[1] and bars[1][-1] == ("4", "4"), bars
    assert bars[3] and bars[3][-1] == ("2", "2"), bars
    assert len(caches[1]) == 4 and caches[1].keys() == caches[3].keys()
    for name, tensors in caches[1].items():
        assert tensors.keys() == caches[3][name].keys()
        for key, value in tensors.items():
            torch.testing.assert_close(caches[3][name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
