"""networks.lora_flux: kohya FLUX names, fused q/k/v modules, identity at init, merging, diffusers interop."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from library.errors import ConfigError, ModelLoadError
from library.models import flux_keys
from library.models.tiny_flux import build_tiny_flux
from networks import lora_flux


def transformer_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h = w = 4
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h).repeat_interleave(w)
    ids[:, 2] = torch.arange(w).repeat(h)
    return dict(hidden_states=torch.randn(1, h * w, 64, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.4]), img_ids=ids,
                txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))


def run(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs).sample


def randomize(network, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def make(models, **kwargs):
    net = lora_flux.create_network(1.0, 4, 2.0, models.ae, [models.clip_l, models.t5], models.transformer, **kwargs)
    net.apply_to([models.clip_l, models.t5], models.transformer, True, True)
    return net


def test_kohya_names_from_the_bfl_layout():
    net = make(build_tiny_flux(0))
    names = {lora.lora_name for lora in net.loras}
    per_double = ["img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "txt_mod_lin",
                  "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
    expected = {f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in per_double}
    expected |= {f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in ("linear1", "linear2", "modulation_lin")}
    assert {n for n in names if n.startswith("lora_unet_")} == expected
    te = {n for n in names if n.startswith("lora_te")}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te and len(te) == 3 * 6
    sd = net.state_dict()
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (96, 4)
    assert sd["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (96 + 128, 4)
    assert sd["lora_unet_single_blocks_0_linear2.lora_down.weight"].shape == (4, 160)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)


def test_block_selection_t5_and_ignored_args(caplog):
    m = build_tiny_flux(0)
    single = {l.lora_name for l in make(m, train_blocks="single").unet_loras}
    assert single and all("single_blocks" in n for n in single)
    m = build_tiny_flux(0)
    double = {l.lora_name for l in make(m, train_blocks="double").unet_loras}
    assert double and all("double_blocks" in n for n in double)
    m = build_tiny_flux(0)
    with caplog.at_level(logging.WARNING):
        net = make(m, train_t5xxl="True", conv_dim="8")
    assert "conv_dim" in caplog.text
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in {l.lora_name for l in net.text_encoder_loras}
    with pytest.raises(ConfigError, match="train_blocks"):
        lora_flux.create_network(1.0, 4, 1.0, None, [], m.transformer, train_blocks="middle")
    with pytest.raises(ConfigError, match="split_qkv"):
        lora_flux.create_network(1.0, 4, 1.0, None, [], m.transformer, split_qkv="maybe")


@pytest.mark.parametrize("split", [False, True])
def test_identity_at_init_merge_and_bfl_layout(split):
    m = build_tiny_flux(0)
    inputs = transformer_inputs()
    base = run(m.transformer, inputs)
    net = make(m, split_qkv=str(split))
    assert torch.equal(run(m.transformer, inputs), base)  # up = 0: the network changes nothing yet
    randomize(net)
    if split:  # keep the trained layout: only the diagonal blocks of up are used
        for lora in net.unet_loras:
            if isinstance(lora, lora_flux.FusedLoRAModule):
                lora.lora_up.weight.data *= lora.up_mask
    with_lora = run(m.transformer, inputs)
    assert (with_lora - base).abs().max() > 1e-3
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    if split:
        assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)
        assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == pytest.approx(6.0)  # 3 x alpha 2
    before = flux_keys.diffusers_to_bfl({k: v.clone() for k, v in m.transformer.state_dict().items()})
    net.merge_to()
    torch.testing.assert_close(run(m.transformer, inputs), with_lora, rtol=1e-4, atol=1e-5)
    # any BFL-layout reader (sd-scripts, ComfyUI) adds up @ down * alpha / rank to the fused weight: check that
    after = flux_keys.diffusers_to_bfl(m.transformer.state_dict())
    for name, key in (("lora_unet_double_blocks_1_txt_attn_qkv", "double_blocks.1.txt_attn.qkv.weight"),
                      ("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1.weight"),
                      ("lora_unet_single_blocks_1_modulation_lin", "single_blocks.1.modulation.lin.weight")):
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        scale = float(sd[f"{name}.alpha"]) / down.shape[0]
        torch.testing.assert_close(after[key] - before[key], up @ down * scale, rtol=1e-4, atol=1e-5)


def test_save_load_roundtrip_and_split_file_loads_fused(tmp_path):
    m = build_tiny_flux(0)
    inputs = transformer_inputs()
    net = make(m, split_qkv="True")
    randomize(net, 3)
    for lora in net.unet_loras:
        if isinstance(lora, lora_flux.FusedLoRAModule):
            lora.lora_up.weight.data *= lora.up_mask
    expected = run(m.transformer, inputs)
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path))
    # a fresh model and a network shaped by the file (fused, no split): same output
    m2 = build_tiny_flux(0)
    net2, sd = lora_flux.create_network_from_weights(1.0, str(path), m2.ae, [m2.clip_l, m2.t5], m2.transformer)
    net2.apply_to([m2.clip_l, m2.t5], m2.transformer, True, True)
    info = net2.load_weights(sd)
    assert info.loaded == len(net.loras) and not info.missing and not info.unexpected
    torch.testing.assert_close(run(m2.transformer, inputs), expected, rtol=1e-5, atol=1e-6)
    # an SDXL file is not a FLUX LoRA
    from safetensors.torch import save_file

    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 4)},
              str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ModelLoadError, match="not a FLUX LoRA"):
        lora_flux.create_network_from_weights(1.0, str(tmp_path / "sdxl.safetensors"), None, [], m2.transformer)


@pytest.mark.parametrize("split", [False, True])
def test_diffusers_load_lora_weights_gives_the_same_outputs(tmp_path, tiny_flux_diffusers, split):
    """diffusers' kohya reader hard-codes FLUX.1's single-block sizes (3072 / 12288) for linear1, so the tiny model
    checks interop on the double blocks (fused q/k/v included) and CLIP-L."""
    from diffusers import FluxPipeline

    m = build_tiny_flux(0)
    inputs = transformer_inputs(5)
    net = make(m, train_blocks="double", split_qkv=str(split))
    randomize(net, 7)
    if split:
        for lora in net.unet_loras:
            if isinstance(lora, lora_flux.FusedLoRAModule):
                lora.lora_up.weight.data *= lora.up_mask
    ours = run(m.transformer, inputs)
    ids = m.tokenizer_clip(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours_text = m.clip_l(ids).pooler_output
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path))
    assert any(k.startswith("lora_te1_text_model_") for k in load_file(str(path)))

    pipe = FluxPipeline.from_pretrained(tiny_flux_diffusers)
    base = run(pipe.transformer, inputs)
    pipe.load_lora_weights(str(path))
    theirs = run(pipe.transformer, inputs)
    with torch.no_grad():
        theirs_text = pipe.text_encoder(ids).pooler_output
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs_text, ours_text, rtol=1e-4, atol=1e-5)
