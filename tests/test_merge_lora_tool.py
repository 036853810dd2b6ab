"""tools/merge_lora.py: a LoRA merged into the single file gives the output of the injected LoRA."""
from __future__ import annotations

import torch

from conftest import run_script


def test_merged_checkpoint_equals_injected_lora(tmp_path, tiny_sdxl_file):
    from library.models.sdxl_loader import load_sdxl
    from networks.lora import create_network, create_network_from_weights

    base = load_sdxl(tiny_sdxl_file)
    tes = [base.text_encoder1, base.text_encoder2]
    net = create_network(1.0, 4, 2.0, None, tes, base.unet, conv_dim="4", conv_alpha="2")
    net.apply_to(tes, base.unet, True, True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora = tmp_path / "l.safetensors"
    net.save_weights(str(lora), None, None)

    r = run_script("tools/merge_lora.py", "--sd_model", tiny_sdxl_file, "--models", str(lora), "--ratios", "0.7",
                   "--save_to", str(tmp_path / "merged.safetensors"))
    assert r.returncode == 0, r.stderr[-2000:]
    merged = load_sdxl(str(tmp_path / "merged.safetensors"))

    ref = load_sdxl(tiny_sdxl_file)
    ref_tes = [ref.text_encoder1, ref.text_encoder2]
    injected, _ = create_network_from_weights(0.7, str(lora), None, ref_tes, ref.unet)
    injected.apply_to(ref_tes, ref.unet, True, True)
    injected.load_weights(str(lora))
    injected.set_multiplier(0.7)

    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    with torch.no_grad():
        a = merged.unet(x, 500, ctx, added_cond_kwargs=added).sample
        b = ref.unet(x, 500, ctx, added_cond_kwargs=added).sample
        base_out = load_sdxl(tiny_sdxl_file).unet(x, 500, ctx, added_cond_kwargs=added).sample
        ta = merged.text_encoder2(ids).text_embeds
        tb = ref.text_encoder2(ids).text_embeds
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, base_out, atol=1e-4)  # the merge did change the model


def test_ratio_count_mismatch_is_clear(tmp_path, tiny_sdxl_file):
    r = run_script("tools/merge_lora.py", "--sd_model", tiny_sdxl_file, "--models", "a.safetensors",
                   "b.safetensors", "--ratios", "1", "--save_to", str(tmp_path / "m.safetensors"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--ratios" in r.stderr
