"""--base_weights / --base_weights_multiplier (library/train/base_weights.py) and --dim_from_weights: networks merged
into the base model before training, and a network shaped after its --network_weights file."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script, save_random_lora
from test_train_sdxl_network import read_losses, run_toml

from library.errors import UserError
from library.train.base_weights import base_weight_multipliers, merge_base_weights

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a layer every LoRA here targets
LORA_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def tiny():
    from library.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(0)


def _lora_file(tiny, path: Path, rank: int, seed: int) -> str:
    from networks.lora import create_network

    net = create_network(1.0, rank, float(rank), None, [tiny.text_encoder1, tiny.text_encoder2], tiny.unet)
    return save_random_lora(net, path, seed=seed, scale=0.5)


def _delta(file: str, key: str) -> torch.Tensor:
    """up @ down * alpha / rank of one module of a kohya file: what merging adds at multiplier 1."""
    sd = load_file(file)
    down, up = sd[f"{key}.lora_down.weight"].float(), sd[f"{key}.lora_up.weight"].float()
    return up @ down * (float(sd[f"{key}.alpha"]) / down.shape[0])


def test_multipliers_pair_with_files_as_sd_scripts():
    assert base_weight_multipliers(["a", "b", "c"], [0.5]) == [0.5, 1.0, 1.0]
    assert base_weight_multipliers(["a"], None) == [1.0]
    assert base_weight_multipliers(["a"], [0.3, 0.7]) == [0.3]  # extra values are not used (with a warning)


def test_merged_weights_are_base_plus_multiplier_times_update(tmp_path, tiny):
    a = _lora_file(tiny, tmp_path / "a.safetensors", rank=2, seed=3)
    b = _lora_file(tiny, tmp_path / "b.safetensors", rank=4, seed=4)
    unet, te1, te2 = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder1), copy.deepcopy(tiny.text_encoder2)
    ncfg = SimpleNamespace(network_module="networks.lora", base_weights=[a, b], base_weights_multiplier=[0.7])
    assert merge_base_weights(ncfg, [te1, te2], unet) > 0
    base = tiny.unet.get_submodule(Q).weight.detach()
    want = base + 0.7 * _delta(a, LORA_Q) + 1.0 * _delta(b, LORA_Q)  # b has no multiplier: 1.0
    torch.testing.assert_close(unet.get_submodule(Q).weight.detach(), want, rtol=1e-5, atol=1e-6)
    # the text encoders take their part too; nothing is left hooked (the model's modules are plain again)
    assert any(not torch.equal(x, y) for x, y in zip(te1.parameters(), tiny.text_encoder1.parameters()))
    assert "forward" not in unet.get_submodule(Q).__dict__
    # nothing to do without the flag; a missing file names the flag
    assert merge_base_weights(SimpleNamespace(network_module="networks.lora", base_weights=None,
                                              base_weights_multiplier=None), [], unet) == 0
    with pytest.raises(UserError, match="--base_weights: no such file"):
        merge_base_weights(SimpleNamespace(network_module="networks.lora", base_weights=[str(tmp_path / "x")],
                                           base_weights_multiplier=None), [te1, te2], unet)


def test_training_on_base_weights_equals_training_from_a_merged_checkpoint(tmp_path, tiny, tiny_sdxl_file,
                                                                         shapes_dataset):
    """The issue's check: --base_weights F --base_weights_multiplier 0.7 trains exactly like a run from the model that
    tools/merge_lora.py merged with F at 0.7, and unlike a run from the plain model."""
    lora = _lora_file(tiny, tmp_path / "base_lora.safetensors", rank=2, seed=3)
    merged = tmp_path / "merged.safetensors"
    r = run_script("tools/merge_lora.py", "--sd_model", tiny_sdxl_file, "--models", lora, "--ratios", "0.7",
                   "--save_to", str(merged))
    assert r.returncode == 0, r.stderr[-3000:]
    losses = {}
    for name, model, extra in (("plain", tiny_sdxl_file, []),
                               ("base", tiny_sdxl_file, ["--base_weights", lora, "--base_weights_multiplier", "0.7"]),
                               ("merged", str(merged), [])):
        cfg = run_toml(tmp_path, model, shapes_dataset["config"], name=name, max_train_steps=1,
                       output_dir=str(tmp_path / name))
        r = run_script("sdxl_train_network.py", "--config_file", cfg, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = read_losses(tmp_path / f"{name}_loss.jsonl")[0]
        assert ("--base_weights: merged" in r.stdout) == (name == "base")
    assert math.isclose(losses["base"], losses["merged"], rel_tol=1e-5, abs_tol=1e-7), losses
    assert not math.isclose(losses["base"], losses["plain"], rel_tol=1e-4), losses


def test_dim_from_weights_takes_the_rank_of_network_weights(tmp_path, tiny, tiny_sdxl_file, shapes_dataset):
    start = _lora_file(tiny, tmp_path / "start.safetensors", rank=2, seed=5)
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=1, network_dim=8)
    r = run_script("sdxl_train_network.py", "--config_file", cfg, "--network_weights", start, "--dim_from_weights")
    assert r.returncode == 0, r.stderr[-3000:]
    sd = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert sd[f"{LORA_Q}.lora_down.weight"].shape[0] == 2  # the file's rank, not --network_dim 8
    assert float(sd[f"{LORA_Q}.alpha"]) == 2.0
    # it continued from the file's weights (one step of 1e-3 moves them only a little)
    first = load_file(start)[f"{LORA_Q}.lora_up.weight"]
    assert torch.allclose(sd[f"{LORA_Q}.lora_up.weight"].float(), first.float(), atol=0.05)
    r = run_script("sdxl_train_network.py", "--config_file", cfg, "--dim_from_weights")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--dim_from_weights takes the rank from --network_weights" in r.stderr


def test_flux_base_weights_merge_into_the_fused_layers(tmp_path):
    """FLUX files publish fused qkv modules: each of our separate projections takes its rows of the update."""
    from library.models.tiny_flux import build_tiny_flux
    from networks.lora_flux import create_network

    tiny = build_tiny_flux(0)
    net = create_network(1.0, 2, 2.0, tiny.ae, [tiny.clip_l, tiny.t5], tiny.transformer)
    file = save_random_lora(net, tmp_path / "flux.safetensors", seed=6, scale=0.5)
    tr = copy.deepcopy(tiny.transformer)
    ncfg = SimpleNamespace(network_module="networks.lora_flux", base_weights=[file], base_weights_multiplier=[0.5])
    assert merge_base_weights(ncfg, [copy.deepcopy(tiny.clip_l), copy.deepcopy(tiny.t5)], tr) > 0
    delta = _delta(file, "lora_unet_double_blocks_0_img_attn_qkv")
    q, k = tiny.transformer.transformer_blocks[0].attn.to_q, tiny.transformer.transformer_blocks[0].attn.to_k
    rows = q.weight.shape[0]
    torch.testing.assert_close(tr.transformer_blocks[0].attn.to_q.weight.detach(),
                               q.weight.detach() + 0.5 * delta[:rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr.transformer_blocks[0].attn.to_k.weight.detach(),
                               k.weight.detach() + 0.5 * delta[rows:2 * rows], rtol=1e-5, atol=1e-6)
