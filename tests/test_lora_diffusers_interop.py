"""A LoRA file written by networks.lora loads with diffusers' own `load_lora_weights` and gives the same outputs.

This is the compatibility promise of the kohya layout: if diffusers (which parses the names back to modules) agrees
with our injected network on every output, the names, the alphas and the conv LoRA shapes are the published ones.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from conftest import randomize_lora_up
from library.models.tiny_configs import TINY_SDXL_TE1, TINY_SDXL_TE2, TINY_SDXL_UNET, TINY_SDXL_VAE
from networks.lora import create_network


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP tokenizer with a 4-token vocabulary: the pipeline needs one, these tests never tokenize prompts."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def count_peft_layers(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0)


@torch.no_grad()
def outputs(te1, te2, unet) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    out2 = te2(ids, output_hidden_states=True)
    out = {
        "te1": te1(ids, output_hidden_states=True).hidden_states[-2],  # the layer SDXL conditions on
        "te2": out2.hidden_states[-2],
        "te2_pooled": out2.text_embeds,
    }
    out["unet"] = unet(
        torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)},
    ).sample
    return out


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_diffusers_load_lora_weights_matches_our_network(tmp_path, conv):
    torch.manual_seed(0)
    te1 = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TE1)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TE2)).eval()
    unet = UNet2DConditionModel(**TINY_SDXL_UNET).eval()
    vae = AutoencoderKL(**TINY_SDXL_VAE).eval()
    te1_d, te2_d, unet_d = copy.deepcopy((te1, te2, unet))  # diffusers' side, before our hooks exist
    base = outputs(te1, te2, unet)

    kwargs = {"conv_dim": "2", "conv_alpha": "1"} if conv else {}
    net = create_network(1.0, 4, 2, None, [te1, te2], unet, **kwargs)
    net.apply_to([te1, te2], unet)
    randomize_lora_up(net, seed=1, scale=0.1)
    ours = outputs(te1, te2, unet)
    for k in base:  # the LoRA really changes every output, so the comparison below is meaningful
        assert not torch.allclose(base[k], ours[k], atol=1e-4), k
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": "networks.lora"})

    tok = tiny_tokenizer(tmp_path)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1_d, text_encoder_2=te2_d, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet_d, scheduler=EulerDiscreteScheduler())
    pipe.load_lora_weights(str(path))
    # every module of ours became a PEFT layer on diffusers' side: nothing was skipped
    assert count_peft_layers(pipe.unet) == len(net.unet_loras)
    te_counts = {p: sum(m.lora_name.startswith(p) for m in net.text_encoder_loras) for p in ("lora_te1", "lora_te2")}
    assert count_peft_layers(pipe.text_encoder) == te_counts["lora_te1"]
    assert count_peft_layers(pipe.text_encoder_2) == te_counts["lora_te2"]

    theirs = outputs(pipe.text_encoder, pipe.text_encoder_2, pipe.unet)
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
