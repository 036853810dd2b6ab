"""sd-scripts' FLUX network_args: per-layer-type ranks, in_dims, train_*_block_indices, network_reg_dims /
network_reg_lrs; ignored ones warn; bad values are ConfigErrors naming the key."""
from __future__ import annotations

import logging

import pytest

from library.errors import ConfigError
from library.models.tiny_flux import build_tiny_flux
from networks import lora_flux

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_flux(0)


def make(models, **kwargs):
    return lora_flux.create_network(1.0, 4, 2.0, models.ae, [models.clip_l, models.t5], models.transformer, **kwargs)


def ranks(net) -> dict[str, int]:
    return {m.lora_name: m.lora_dim for m in net.loras}


def test_type_dims_give_each_layer_type_its_rank(tiny):
    r = ranks(make(tiny, img_attn_dim="8", txt_mlp_dim="0", single_dim="2", single_mod_dim="3"))
    assert r["lora_unet_double_blocks_0_img_attn_qkv"] == 8 and r["lora_unet_double_blocks_1_img_attn_proj"] == 8
    assert not any("txt_mlp" in n for n in r)  # 0: left out
    assert r["lora_unet_single_blocks_0_linear1"] == 2 and r["lora_unet_single_blocks_1_linear2"] == 2
    assert r["lora_unet_single_blocks_0_modulation_lin"] == 3
    assert r["lora_unet_double_blocks_0_img_mlp_0"] == 4  # no type dim: network_dim


def test_in_dims_add_the_input_layers(tiny):
    net = make(tiny, in_dims="[2,0,3,0,5]")
    r = ranks(net)
    assert r["lora_unet_img_in"] == 2 and r["lora_unet_txt_in"] == 5
    assert r["lora_unet_vector_in_in_layer"] == 3 and r["lora_unet_vector_in_out_layer"] == 3
    assert not any("time_in" in n or "guidance_in" in n for n in r)
    # the file round-trips: a network shaped from it has the same modules and ranks
    sd = net.state_dict()
    again, _ = lora_flux.create_network_from_weights(1.0, None, None, [tiny.clip_l, tiny.t5], tiny.transformer,
                                                     weights_sd=sd)
    assert ranks(again) == r


def test_block_indices_select_blocks(tiny):
    r = ranks(make(tiny, train_double_block_indices="1", train_single_block_indices="none"))
    assert {n.split("_")[4] for n in r if n.startswith("lora_unet_double_blocks_")} == {"1"}
    assert not any(n.startswith("lora_unet_single_blocks_") for n in r)
    r = ranks(make(tiny, train_single_block_indices="0-1"))
    assert {n.split("_")[4] for n in r if n.startswith("lora_unet_single_blocks_")} == {"0", "1"}


def test_regex_dims_and_lrs(tiny):
    net = make(tiny, network_reg_dims="img_attn=6,self_attn=0", network_reg_lrs="single_blocks=1e-5,txt_mod=0.5")
    r = ranks(net)
    assert r["lora_unet_double_blocks_0_img_attn_qkv"] == 6
    assert not any("self_attn" in n for n in r) and any("mlp_fc1" in n for n in r)  # text encoder too
    groups, names = net.prepare_optimizer_params(1e-4, 1e-3, 1e-3)
    lrs = dict(zip(names, (g["lr"] for g in groups)))
    assert lrs["reg_lr_0"] == 1e-5 and lrs["reg_lr_1"] == 0.5 and lrs["unet"] == 1e-3
    by_group = dict(zip(names, groups))
    single = {id(p) for m in net.unet_loras if "single_blocks" in m.lora_name for p in m.parameters()}
    assert {id(p) for p in by_group["reg_lr_0"]["params"]} == single
    assert not single & {id(p) for p in by_group["unet"]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_ignored_args_warn(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="networks.lora_flux"):
        make(tiny, ggpo_beta="0.01", down_lr_weight="1,1,1,1,1,1,1,1,1")
    text = caplog.text
    assert "ggpo_beta" in text and "GGPO" in text and "down_lr_weight" in text


@pytest.mark.parametrize("key, value, expected", [
    ("img_attn_dim", "x", "non-negative integer"),
    ("in_dims", "1,2,3", "expected 5"),
    ("train_double_block_indices", "0-9", "outside"),
    ("train_single_block_indices", "a", "not a block index"),
    ("network_reg_dims", "img(=4", "not a regular expression"),
    ("network_reg_lrs", "img", "regex=value"),
])
def test_bad_values_name_the_key(tiny, key, value, expected):
    with pytest.raises(ConfigError) as e:
        make(tiny, **{key: value})
    assert f"key '{key}'" in str(e.value) and expected in str(e.value)
