"""--vae: a separate VAE as a published-layout single file or a diffusers folder."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.errors import ModelLoadError


def test_vae_single_file_and_folder_load_the_same_weights(tmp_path):
    from library.models import sdxl_keys
    from library.models.sdxl_loader import load_sdxl_vae
    from library.models.tiny import build_tiny_sdxl

    vae = build_tiny_sdxl(seed=3).vae
    ldm = sdxl_keys.diffusers_vae_to_ldm(vae.state_dict())
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "vae.safetensors"))
    prefixed = {sdxl_keys.VAE_PREFIX + k: v.contiguous() for k, v in ldm.items()}
    save_file(prefixed, str(tmp_path / "vae_prefixed.safetensors"))
    vae.save_pretrained(tmp_path / "vae_folder")
    for path in ("vae.safetensors", "vae_prefixed.safetensors", "vae_folder"):
        loaded = load_sdxl_vae(str(tmp_path / path))
        for k, v in vae.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (path, k)


def test_not_a_vae_is_a_clear_error(tmp_path):
    from library.models.sdxl_loader import load_sdxl_vae

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelLoadError, match="not a VAE file"):
        load_sdxl_vae(str(tmp_path / "x.safetensors"))
