"""sdxl_train_control_net_lllite.py on the tiny model: smoke, loss regression, and learning the layout."""
from __future__ import annotations

import json
import math

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, run_script
from test_train_sdxl_network import read_losses, run_toml

LLLITE = dict(network_module="networks.control_net_lllite", network_dim=8, cond_emb_dim=8)


def test_two_step_smoke_writes_published_layout(tmp_path, tiny_sdxl_file, shapes_dataset):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red square --w 64 --h 64 --s 2 --d 3 --cn {shapes_dataset['cond_dir']}/img_0000.png\n")
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["cn_config"], output_name="lllite",
                   sample_prompts=str(prompts), sample_every_n_steps=2, sample_sampler="euler", **LLLITE)
    r = run_script("sdxl_train_control_net_lllite.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out" / "lllite.safetensors"
    sd = load_file(str(out))
    name = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert f"{name}.conditioning1.0.weight" in sd and f"{name}.down.0.weight" in sd
    assert f"{name}.mid.0.weight" in sd and f"{name}.up.0.weight" in sd
    assert not any("output_blocks" in k for k in sd)
    assert not any("attn2_to_k" in k for k in sd)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.control_net_lllite"
    samples = list((tmp_path / "out" / "sample").glob("*.png"))
    assert len(samples) == 1


def test_needs_conditioning_dataset(tmp_path, tiny_sdxl_file, shapes_dataset):
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], **LLLITE)
    r = run_script("sdxl_train_control_net_lllite.py", "--config_file", cfg)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "conditioning_data_dir" in r.stderr


def test_loss_regression_against_stored_values(tmp_path, tiny_sdxl_file, shapes_dataset):
    stored = json.loads((REPO / "tests" / "data" / "loss_regression_sdxl_lllite.json").read_text())
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["cn_config"], max_train_steps=len(stored["losses"]),
                   **LLLITE)
    r = run_script("sdxl_train_control_net_lllite.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    for got, want in zip(read_losses(tmp_path / "run_loss.jsonl"), stored["losses"]):
        assert math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-5)


def _heldout_loss(models, net, latents, cond, text, multiplier: float) -> float:
    """Denoising loss with fixed noise and timesteps: comparable between the trained and untrained network."""
    from library.families.noise import add_noise, ddpm_alphas_cumprod

    g = torch.Generator().manual_seed(123)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.full((latents.shape[0],), 700, dtype=torch.long)
    noisy = add_noise(latents, noise, t, ddpm_alphas_cumprod())
    net.set_multiplier(multiplier)
    net.set_cond_image(cond)
    b = latents.shape[0]
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * b, dtype=torch.float32)
    with torch.no_grad():
        pred = models.unet(noisy, t, text["encoder_hidden_states"].expand(b, -1, -1),
                           added_cond_kwargs={"text_embeds": text["pooled"].expand(b, -1), "time_ids": time_ids}).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


def test_trained_lllite_uses_the_conditioning(tmp_path, tiny_sdxl_file):
    """After training on shapes whose position the conditioning image gives, the U-Net output depends on the
    conditioning image and the trained LLLite beats the untrained one on held-out pairs. (That it learns the
    position itself, not only a bias, is shown on a designed target in test_lllite_network.py: the tiny random
    U-Net here is too weak a base for that to show in 40 steps.)"""
    from conftest import write_dataset_toml
    from library.data.images import load_image
    from library.data.synthetic import make_shapes_dataset
    from library.models.sdxl_loader import load_sdxl
    from library.families.sdxl import SDXLFamily, SDXLFamilyModels
    from networks.control_net_lllite import create_network_from_weights

    make_shapes_dataset(str(tmp_path / "img"), 8, seed=1, conditioning_dir=str(tmp_path / "cond"))
    make_shapes_dataset(str(tmp_path / "held_img"), 4, seed=99, conditioning_dir=str(tmp_path / "held_cond"))
    ds = write_dataset_toml(tmp_path / "ds.toml", {"resolution": 64, "batch_size": 4, "subsets": [
        {"image_dir": str(tmp_path / "img"), "conditioning_data_dir": str(tmp_path / "cond")}]},
        general={"caption_extension": ".txt", "class_tokens": "shape"})
    cfg = run_toml(tmp_path, tiny_sdxl_file, ds, max_train_steps=40, learning_rate=3e-2, min_timestep=500,
                   max_timestep=900, cache_latents=True, **LLLITE)
    r = run_script("sdxl_train_control_net_lllite.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]

    models = load_sdxl(tiny_sdxl_file)
    family = SDXLFamily()
    fam_models = SDXLFamilyModels.from_loaded(models)
    net = create_network_from_weights(models.unet, str(tmp_path / "out" / "lora.safetensors"), multiplier=1.0)
    net.apply_to()

    def pixels(folder: str, signed: bool) -> torch.Tensor:
        ims = [load_image(str(tmp_path / folder / f"img_{i:04d}.png")).rgb for i in range(4)]
        t = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in ims])
        return t * 2 - 1 if signed else t

    with torch.no_grad():
        latents = family.encode_images(fam_models, pixels("held_img", True))
        text = family.encode_text(fam_models, ["a shape"])
    cond = pixels("held_cond", False)
    trained = _heldout_loss(models, net, latents, cond, text, 1.0)
    untrained = _heldout_loss(models, net, latents, cond, text, 0.0)
    shuffled = _heldout_loss(models, net, latents, cond.roll(1, dims=0), text, 1.0)
    assert trained < 0.97 * untrained, (trained, untrained)
    assert shuffled != trained  # the output depends on which conditioning image is given


def test_low_memory_flags(tmp_path, tiny_sdxl_file, shapes_dataset):
    """The low-memory set of the LoRA script works for LLLite too: gradient checkpointing, cached latents and
    text-encoder outputs (on disk), bf16 with bf16 trainable weights, 8-bit AdamW."""
    prompts = tmp_path / "prompts.txt"  # sampling must bring back the VAE and text encoders parked after caching
    prompts.write_text(f"a red square --w 64 --h 64 --s 2 --d 3 --cn {shapes_dataset['cond_dir']}/img_0000.png\n")
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["cn_config"], max_train_steps=2, gradient_checkpointing=True,
                   cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True, mixed_precision="bf16",
                   full_bf16=True, optimizer_type="AdamW8bit", save_precision="fp16", sample_prompts=str(prompts),
                   sample_every_n_steps=1, sample_sampler="euler", **LLLITE)
    r = run_script("sdxl_train_control_net_lllite.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    sd = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("up.0.weight"))  # it trained
    assert list((tmp_path / "images").glob("*.latents.safetensors"))  # latent cache on disk beside the images
    assert list((tmp_path / "out" / "te_cache").glob("*.safetensors"))
    losses = read_losses(tmp_path / "run_loss.jsonl")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 2
