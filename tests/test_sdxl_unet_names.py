"""The diffusers <-> SGM U-Net name tables cover the real SDXL layout and round-trip."""
from __future__ import annotations

import re

import pytest
from diffusers import UNet2DConditionModel

from library.models.sdxl_unet_names import diffusers_to_sgm, kohya_unet_name, sgm_to_diffusers
from library.models.tiny_configs import TINY_SDXL_UNET

# Parameter-free modules with no one-to-one SGM counterpart (containers, shared activations, timestep projections).
UNMAPPED = re.compile(
    r"^(time_proj|add_time_proj|(down|up)_blocks(\.\d+(\.(resnets|attentions|downsamplers|upsamplers))?)?"
    r"|mid_block(\.(resnets|attentions))?|.*\.nonlinearity)$"
)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**TINY_SDXL_UNET)


def test_every_parameter_maps_and_round_trips(unet):
    sgm_names = set()
    for name, _ in unet.named_parameters():
        sgm = diffusers_to_sgm(name)
        assert sgm_to_diffusers(sgm) == name
        sgm_names.add(sgm)
    assert len(sgm_names) == len(list(unet.named_parameters()))


def test_every_module_maps_or_is_a_parameter_free_container(unet):
    for name, module in unet.named_modules():
        if not name:
            continue
        if UNMAPPED.match(name):
            assert not list(module.parameters(recurse=False)), name
            with pytest.raises(KeyError):
                diffusers_to_sgm(name)
            continue
        sgm = diffusers_to_sgm(name)
        assert sgm_to_diffusers(sgm) == name, (name, sgm)


@pytest.mark.parametrize(
    "diffusers, sgm",
    [
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("time_embedding.linear_1.weight", "time_embed.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
        ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
        ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
        ("down_blocks.0.resnets.1.conv1.weight", "input_blocks.2.0.in_layers.2.weight"),
        ("down_blocks.0.resnets.1.time_emb_proj.bias", "input_blocks.2.0.emb_layers.1.bias"),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
        ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("down_blocks.2.attentions.1.proj_out.weight", "input_blocks.8.1.proj_out.weight"),
        ("mid_block.resnets.0.norm2.weight", "middle_block.0.out_layers.0.weight"),
        ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
        ("mid_block.resnets.1.conv2.weight", "middle_block.2.out_layers.3.weight"),
        ("up_blocks.0.resnets.0.conv1.weight", "output_blocks.0.0.in_layers.2.weight"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
        ("up_blocks.1.attentions.2.proj_in.weight", "output_blocks.5.1.proj_in.weight"),
        ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
        ("up_blocks.2.resnets.2.conv_shortcut.weight", "output_blocks.8.0.skip_connection.weight"),
        ("conv_norm_out.weight", "out.0.weight"),
        ("conv_out.bias", "out.2.bias"),
    ],
)
def test_known_sdxl_names(diffusers, sgm):
    assert diffusers_to_sgm(diffusers) == sgm
    assert sgm_to_diffusers(sgm) == diffusers


@pytest.mark.parametrize(
    "bad", ["foo", "down_blocks.0.resnets.0.bogus", "input_blocks.9.0", "input_blocks.2.0.in_layers.1", "out.3", ""]
)
def test_unknown_paths_raise_key_error_with_the_path(bad):
    for translate in (diffusers_to_sgm, sgm_to_diffusers):
        with pytest.raises(KeyError) as info:
            translate(bad)
        assert info.value.args[0] == bad


def test_kohya_name():
    name = kohya_unet_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert name == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
