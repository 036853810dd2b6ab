"""Block-wise LoRA network_args for SDXL (sd-scripts' block_dims, block_alphas, conv_block_*, *_lr_weight,
block_lr_zero_threshold): ranks per block in the saved file, learning rates per block, frozen blocks left out."""
from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from conftest import run_script, write_toml
from library.errors import ConfigError
from networks import block_args
from networks import kohya_names as kn
from networks.lora import create_network
from test_lora_network import base_models, models  # noqa: F401 - the tiny SDXL fixtures, shared

pytestmark = pytest.mark.usefixtures("one_thread")

# one distinct rank per block (blocks 0 and 22 hold no modules), so each module's rank tells its block
BLOCK_DIMS = [1 + (i % 5) for i in range(23)]


def unet_blocks(network) -> dict[int, set[tuple[int, bool]]]:
    """block index -> {(rank, is 3x3 conv)} of the network's U-Net modules."""
    out: dict[int, set[tuple[int, bool]]] = {}
    for m in network.unet_loras:
        w = m.lora_down.weight
        out.setdefault(kn.sdxl_block_index(m.lora_name), set()).add((m.lora_dim, w.dim() == 4 and w.shape[2:] != (1, 1)))
    return out


def test_block_index_follows_sd_scripts_numbering():
    assert kn.sdxl_block_index("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == 5
    assert kn.sdxl_block_index("lora_unet_middle_block_1_proj_in") == 11
    assert kn.sdxl_block_index("lora_unet_output_blocks_8_0_in_layers_2") == 21
    assert kn.sdxl_block_index("lora_unet_time_embed_0") == 0
    assert kn.sdxl_block_index("lora_unet_out_2") == 22
    assert kn.sdxl_block_index("lora_te1_text_model_encoder_layers_0_mlp_fc1") == -1


def test_block_dims_and_conv_block_dims_set_each_blocks_rank(models):
    te1, te2, unet = models
    conv = [2 + (i % 3) for i in range(23)]
    net = create_network(1.0, 8, 4.0, None, [te1, te2], unet, block_dims=",".join(map(str, BLOCK_DIMS)),
                         block_alphas=",".join(str(d / 2) for d in BLOCK_DIMS),
                         conv_block_dims=",".join(map(str, conv)))
    blocks = unet_blocks(net)
    assert set(blocks) == set(range(1, 22)) - {1}  # input_blocks.0 is conv_in: no module there, as in sd-scripts
    for i, kinds in blocks.items():
        for rank, is_conv in kinds:
            assert rank == (conv[i] if is_conv else BLOCK_DIMS[i]), (i, rank, is_conv)
    assert any(is_conv for kinds in blocks.values() for _, is_conv in kinds)
    for m in net.unet_loras:
        if m.lora_down.weight.dim() == 2:
            assert float(m.alpha) == BLOCK_DIMS[kn.sdxl_block_index(m.lora_name)] / 2
    assert {m.lora_dim for m in net.text_encoder_loras} == {8}  # text encoders keep network_dim


def test_lr_weights_scale_each_blocks_learning_rate(models):
    te1, te2, unet = models
    up = [1.0, 2.0, 0.5, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0]
    net = create_network(1.0, 4, 4.0, None, [te1, te2], unet, up_lr_weight=",".join(map(str, up)),
                         mid_lr_weight="1,0.25,0.5")
    groups, names = net.prepare_optimizer_params(1e-5, 1e-3, 1e-4)
    lrs = dict(zip(names, (g["lr"] for g in groups)))
    assert lrs["textencoder 1"] == lrs["textencoder 2"] == 1e-5
    for i in (13, 14, 15, 18):
        assert lrs[f"unet_block{i}"] == pytest.approx(1e-3 * up[i - 13])
    assert lrs["unet_block11"] == pytest.approx(2.5e-4)  # middle_block.1, the only one with a transformer
    assert lrs["unet_block5"] == pytest.approx(1e-3)  # down_lr_weight not given: 1.0
    # every U-Net parameter is in exactly one group
    in_groups = [id(p) for g, n in zip(groups, names) if n.startswith("unet") for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for m in net.unet_loras for p in m.parameters())


def test_preset_and_zero_threshold_leave_blocks_out(models):
    te1, te2, unet = models
    # linear over the 9 input blocks: 0, 1/8, ..., 1; with the threshold 0.3 the first three become 0
    net = create_network(1.0, 4, 4.0, None, [te1, te2], unet, down_lr_weight="linear",
                         block_lr_zero_threshold="0.3")
    assert net.block_lr_weight[1:10] == pytest.approx([0, 0, 0] + [i / 8 for i in range(3, 9)])
    blocks = unet_blocks(net)
    assert not {1, 2, 3} & set(blocks) and {5, 6, 8, 9} <= set(blocks)
    groups, names = net.prepare_optimizer_params(None, 1e-3, 1e-3)
    assert not any(n in names for n in ("unet_block1", "unet_block2", "unet_block3"))
    assert all(g["lr"] > 0 for g in groups)
    assert block_args.parse_block_lr_weights({"up_lr_weight": "cosine+0.5"})[13:22] == pytest.approx(
        [math.sin(math.pi * i / 16) + 0.5 for i in reversed(range(9))])


@pytest.mark.parametrize("key, value, expected", [
    ("block_dims", "4,4,4", "expected 23"),
    ("block_dims", ",".join(["4"] * 22 + ["x"]), "'x' is not a number"),
    ("block_dims", ",".join(["4"] * 22 + ["2.5"]), "not a rank"),
    ("block_alphas", ",".join(["1"] * 5), "expected 23"),
    ("up_lr_weight", "cosin", "preset"),
    ("down_lr_weight", "0.5", "preset"),
    ("mid_lr_weight", "1,a,1", "'a' is not a number"),
    ("block_lr_zero_threshold", "low", "'low' is not a number"),
])
def test_bad_block_strings_name_the_key(models, key, value, expected):
    te1, te2, unet = models
    extra = {} if key in ("block_dims", "up_lr_weight", "down_lr_weight", "mid_lr_weight") else {"block_dims": ",".join(
        ["4"] * 23)}
    if key == "block_lr_zero_threshold":
        extra = {"up_lr_weight": "linear"}
    with pytest.raises(ConfigError) as e:
        create_network(1.0, 4, 4.0, None, [te1, te2], unet, **{key: value, **extra})
    assert f"key '{key}'" in str(e.value) and "--network_args" in str(e.value) and expected in str(e.value)


def test_block_args_through_the_script(tmp_path, tiny_sdxl_file, shapes_dataset):
    """What a user runs: sd-scripts' network_args on the command line; the saved file has the block ranks and no
    module in the blocks whose lr weight is 0."""
    out = tmp_path / "out"
    up = "0,1,1,1,1,1,1,1,1"  # output_blocks.0 frozen: left out
    cfg = write_toml(tmp_path / "run.toml", "\n".join([
        f"pretrained_model_name_or_path = {json.dumps(tiny_sdxl_file)}",
        f"dataset_config = {json.dumps(shapes_dataset['config'])}",
        f"output_dir = {json.dumps(str(out))}", 'output_name = "lora"', 'network_module = "networks.lora"',
        "network_dim = 4", "network_alpha = 4.0", "learning_rate = 1e-3", "max_train_steps = 1", "seed = 1",
        'optimizer_type = "AdamW"', "network_train_unet_only = true",
    ]) + "\n")
    r = run_script("sdxl_train_network.py", "--config_file", cfg, "--network_args",
                   f"block_dims={','.join(map(str, BLOCK_DIMS))}", f"up_lr_weight={up}")
    assert r.returncode == 0, r.stderr[-3000:]
    sd = load_file(str(out / "lora.safetensors"))
    ranks: dict[int, set[int]] = {}
    for key, value in sd.items():
        if key.endswith(".lora_down.weight"):
            ranks.setdefault(kn.sdxl_block_index(key.split(".")[0]), set()).add(int(value.shape[0]))
    assert 13 not in ranks and {5, 6, 8, 9, 11, 14, 15, 16, 17, 18} <= set(ranks)
    for i, found in ranks.items():
        assert found == {BLOCK_DIMS[i]}, (i, found)
