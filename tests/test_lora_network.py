"""networks.lora: kohya names, untrained = identity, save/load, merge, dropout, weights inference, metadata."""
from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.errors import ConfigError, ModelLoadError
from library.models.tiny_configs import TINY_SDXL_TE1, TINY_SDXL_TE2, TINY_SDXL_UNET
from networks import kohya_names
from networks import lora as lora_mod
from networks.lora import LoRAModule, build_ss_metadata, create_network, create_network_from_weights


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    te1 = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TE1)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TE2)).eval()
    unet = UNet2DConditionModel(**TINY_SDXL_UNET).eval()
    return te1, te2, unet


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_models():
    return make_models(0)


@pytest.fixture
def models(base_models):
    """Fresh copies per test: networks hook into the modules they are built from."""
    return copy.deepcopy(base_models)


def unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 4, 16, 16, generator=g),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 77, 64, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)},
    )


def token_ids(seed: int = 2):
    return torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run_all(te1, te2, unet):
    ids = token_ids()
    out2 = te2(ids)
    return {
        "te1": te1(ids).last_hidden_state,
        "te2": out2.last_hidden_state,
        "te2_proj": out2.text_embeds,
        "unet": unet(**unet_inputs()).sample,
    }


def randomize(network, seed: int = 3, scale: float = 0.1) -> None:
    """Nonzero `up` (and fresh `down`) so the network has an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * scale)
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * scale)


def assert_close_all(a, b, atol=1e-5):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")


# ---- names -----------------------------------------------------------------------------------------------------


def test_names_are_the_published_kohya_form(models):
    te1, te2, unet = models
    net = create_network(1.0, 4, 1, None, [te1, te2], unet)
    names = {m.lora_name for m in net.loras}
    for expected in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_input_blocks_8_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_input_blocks_8_1_transformer_blocks_0_ff_net_2",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_middle_block_1_proj_out",
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_v",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_2_mlp_fc2",
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",
    ):
        assert expected in names, expected
    # 11 transformer containers x (proj_in, proj_out + 10 in the block); 2 encoders x 3 layers x 6 linears.
    assert len(net.unet_loras) == 11 * 12
    assert len(net.text_encoder_loras) == 2 * 3 * 6
    assert not any("_encoder_layers_" in n and "_text_model_" not in n for n in names)  # never transformers-5 names
    assert not any(n.startswith("lora_unet_down_blocks") or "resnets" in n for n in names)
    assert not any("text_projection" in n or "in_layers" in n or "_op" in n for n in names)  # no conv without conv_dim
    assert set(net.state_dict()) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}


def test_conv_dim_adds_locon_modules_with_sd_scripts_ranks(models):
    te1, te2, unet = models
    net = create_network(1.0, 8, 4, None, [te1, te2], unet, conv_dim="2", conv_alpha="1")
    by_name = {m.lora_name: m for m in net.loras}
    # 3x3 convs in resnets, downsamplers, upsamplers: conv rank, kxk down with the layer's stride, 1x1 up
    for name in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_out_layers_3",
                 "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
                 "lora_unet_output_blocks_5_2_conv", "lora_unet_middle_block_2_in_layers_2"):
        m = by_name[name]
        assert m.lora_dim == 2 and float(m.alpha) == 1.0, name
        assert m.lora_down.kernel_size == (3, 3) and m.lora_up.kernel_size == (1, 1)
    assert by_name["lora_unet_input_blocks_3_0_op"].lora_down.stride == (2, 2)
    # Linear and 1x1 inside those containers take the linear rank, as in sd-scripts
    for name in ("lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_4_0_skip_connection",
                 "lora_unet_output_blocks_0_0_skip_connection"):
        assert by_name[name].lora_dim == 8 and float(by_name[name].alpha) == 4.0, name
    # 17 resnets x 3 + 10 shortcuts + 2 downsamplers + 2 upsamplers on top of the 132 transformer modules
    assert len(net.unet_loras) == 132 + 17 * 3 + 10 + 4
    assert "lora_unet_input_blocks_0_0" not in by_name and "lora_unet_out_2" not in by_name  # conv_in/out untouched


def test_kohya_name_helpers():
    assert kohya_names.lora_name("lora_te1", "text_model.encoder.layers.0.mlp.fc1") == \
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    assert kohya_names.published_clip_path("encoder.layers.3.self_attn.q_proj") == \
        "text_model.encoder.layers.3.self_attn.q_proj"
    assert kohya_names.published_clip_path("text_model.encoder.layers.3.self_attn.q_proj") == \
        "text_model.encoder.layers.3.self_attn.q_proj"
    assert kohya_names.normalize_lora_name("lora_te2_encoder_layers_5_mlp_fc2") == \
        "lora_te2_text_model_encoder_layers_5_mlp_fc2"
    assert kohya_names.normalize_lora_name("lora_te_encoder_layers_0_mlp_fc2") == \
        "lora_te_text_model_encoder_layers_0_mlp_fc2"
    # T5 (FLUX te3) never had the wrapper; U-Net names are left alone
    assert kohya_names.normalize_lora_name("lora_te3_encoder_block_0_layer_0_SelfAttention_q") == \
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    assert kohya_names.normalize_lora_name("lora_unet_middle_block_1_proj_in") == "lora_unet_middle_block_1_proj_in"


def test_single_text_encoder_uses_lora_te_prefix(models):
    te1, _, unet = models
    net = create_network(1.0, 4, 1, None, te1, None)
    assert net.text_encoder_loras and not net.unet_loras
    assert all(m.lora_name.startswith("lora_te_text_model_encoder_layers_") for m in net.loras)


# ---- behaviour -------------------------------------------------------------------------------------------------


def test_untrained_network_changes_nothing_and_restore_is_exact(models):
    te1, te2, unet = models
    before = run_all(te1, te2, unet)
    sd_keys = set(unet.state_dict())
    net = create_network(1.0, 4, 1, None, [te1, te2], unet, conv_dim="4", conv_alpha="2")
    net.apply_to([te1, te2], unet)
    after = run_all(te1, te2, unet)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert set(unet.state_dict()) == sd_keys  # base model names unchanged (its weights are not re-registered)
    randomize(net)
    changed = run_all(te1, te2, unet)
    for k in before:
        assert not torch.allclose(before[k], changed[k]), k
    net.restore()
    restored = run_all(te1, te2, unet)
    for k in before:
        assert torch.equal(before[k], restored[k]), k


def test_multiplier_scales_the_update(models):
    te1, te2, unet = models
    base = run_all(te1, te2, unet)
    net = create_network(1.0, 4, 2, None, [te1, te2], unet, conv_dim="2")
    net.apply_to([te1, te2], unet)
    randomize(net, scale=0.02)
    full = run_all(te1, te2, unet)
    net.set_multiplier(0.0)
    assert_close_all(run_all(te1, te2, unet), base, atol=0)
    # one LoRA layer: the update is exactly linear in the multiplier
    layer = torch.nn.Linear(8, 6)
    m = LoRAModule("x", layer, multiplier=1.0, lora_dim=2, alpha=1)
    m.apply_to()
    torch.nn.init.normal_(m.lora_up.weight)
    x = torch.randn(3, 8)
    with torch.no_grad():
        d1 = layer(x) - m._org_forward(x)
        m.multiplier = 0.5
        d05 = layer(x) - m._org_forward(x)
        torch.testing.assert_close(d05 * 2, d1)
        # the scale is alpha / dim
        torch.testing.assert_close(d1, m.lora_up(m.lora_down(x)) * (1.0 / 2))
    assert any(not torch.allclose(full[k], base[k]) for k in base)


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16)
    m = LoRAModule("x", layer, lora_dim=8, alpha=8, dropout=0.5, rank_dropout=0.5, module_dropout=0.3)
    m.apply_to()
    torch.nn.init.normal_(m.lora_up.weight)
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        clean = m._org_forward(x) + m.lora_up(m.lora_down(x))
        m.eval()
        torch.testing.assert_close(layer(x), clean)
        torch.testing.assert_close(layer(x), clean)
        m.train()
        outs = [layer(x) for _ in range(8)]
    assert any(not torch.allclose(o, clean) for o in outs)
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # random per call
    # conv modules: rank dropout masks channels, no error on 4-d activations
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    mc = LoRAModule("c", conv, lora_dim=2, rank_dropout=0.5)
    mc.apply_to()
    mc.train()
    assert conv(torch.randn(2, 4, 8, 8)).shape == (2, 4, 8, 8)


def test_merge_equals_injected_output(models, base_models):
    te1, te2, unet = models
    net = create_network(0.7, 4, 2, None, [te1, te2], unet, conv_dim="2", conv_alpha="1")
    net.apply_to([te1, te2], unet)
    randomize(net, scale=0.05)
    injected = run_all(te1, te2, unet)
    sd = {k: v.clone() for k, v in net.state_dict().items()}

    fresh = copy.deepcopy(base_models)
    merged = lora_mod.merge_lora_state_dict_into(list(fresh[:2]), fresh[2], sd, multiplier=0.7)
    assert merged == len(net.loras)
    assert_close_all(run_all(*fresh), injected, atol=2e-5)

    # the method form unhooks what it merged: the output stays the same
    net.merge_to([te1, te2], unet, None)
    assert_close_all(run_all(te1, te2, unet), injected, atol=2e-5)


# ---- files -----------------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_identical(models, tmp_path):
    te1, te2, unet = models
    net = create_network(1.0, 4, 2, None, [te1, te2], unet, conv_dim="2", conv_alpha="1")
    net.apply_to([te1, te2], unet)
    randomize(net)
    meta = build_ss_metadata(network_dim=4, network_alpha=2, network_args={"conv_dim": "2", "conv_alpha": "1"},
                             learning_rate=1e-4, seed=42, resolution=(64, 64), output_name="x")
    path = tmp_path / "out" / "lora.safetensors"
    net.save_weights(str(path), None, meta)
    assert [p.name for p in path.parent.iterdir()] == ["lora.safetensors"]  # no temp file left behind

    with safetensors.safe_open(str(path), framework="pt") as f:
        file_meta = f.metadata()
        keys = set(f.keys())
    assert keys == set(net.state_dict())
    for k, v in meta.items():
        assert file_meta[k] == v
    # sshs_model_hash is the sha256 of the tensor bytes (everything after the header)
    blob = path.read_bytes()
    header = int.from_bytes(blob[:8], "little")
    assert file_meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header:]).hexdigest()
    assert len(file_meta["sshs_legacy_hash"]) == 8

    net2 = create_network(1.0, 4, 1, None, [te1, te2], unet, conv_dim="2", conv_alpha="2")  # other alphas
    info = net2.load_weights(str(path))
    assert not info.missing and not info.unexpected and info.loaded == len(net.loras)
    sd1, sd2 = net.state_dict(), net2.state_dict()
    assert set(sd1) == set(sd2)
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    # the loaded alpha decides the scale (alpha / rank)
    assert {m.lora_name: m.scale for m in net2.loras} == {m.lora_name: m.scale for m in net.loras}
    assert net2.loras[0].scale == 0.5

    # fp16 save: tensors (alpha included) in the requested dtype
    half = tmp_path / "half.safetensors"
    net.save_weights(str(half), torch.float16, None)
    assert {v.dtype for v in safetensors.torch.load_file(str(half)).values()} == {torch.float16}


def test_transformers5_text_encoder_names_load(models, tmp_path):
    te1, te2, unet = models
    net = create_network(1.0, 4, 1, None, [te1, te2], unet)
    randomize(net)
    sd = net.state_dict()
    renamed = {k.replace("_text_model_encoder_layers_", "_encoder_layers_"): v.clone() for k, v in sd.items()}
    assert sum(k.startswith("lora_te1_encoder_layers_") for k in renamed) == 18 * 3
    path = tmp_path / "tf5.safetensors"
    safetensors.torch.save_file(renamed, str(path))

    net2 = create_network(1.0, 4, 1, None, [te1, te2], unet)
    info = net2.load_weights(str(path), strict=True)
    assert info.loaded == len(net.loras)
    for k, v in net2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    net3, weights = create_network_from_weights(1.0, str(path), None, [te1, te2], unet)
    assert {m.lora_name for m in net3.loras} == {m.lora_name for m in net.loras}
    assert set(weights) == set(sd)  # returned with the published names
    net3.load_state_dict(renamed)  # direct load_state_dict reads both spellings too


def test_create_network_from_weights_infers_dims_and_alphas(models, tmp_path):
    te1, te2, unet = models
    net = create_network(1.0, 8, 3, None, [te1, te2], unet, conv_dim="2", conv_alpha="0.5")
    net.apply_to([te1, te2], unet, apply_text_encoder=False)  # unet-only file
    path = tmp_path / "l.safetensors"
    net.save_weights(str(path))
    sd = safetensors.torch.load_file(str(path))
    # give one module its own rank and drop its alpha (alpha then defaults to the rank)
    name = "lora_unet_middle_block_1_proj_in"
    sd[f"{name}.lora_down.weight"] = torch.zeros(5, sd[f"{name}.lora_down.weight"].shape[1])
    sd[f"{name}.lora_up.weight"] = torch.zeros(sd[f"{name}.lora_up.weight"].shape[0], 5)
    del sd[f"{name}.alpha"]
    safetensors.torch.save_file(sd, str(path))

    te1b, te2b, unetb = make_models(0)
    inferred, weights = create_network_from_weights(1.0, str(path), None, [te1b, te2b], unetb)
    dims = {m.lora_name: (m.lora_dim, float(m.alpha)) for m in inferred.loras}
    assert not inferred.text_encoder_loras
    assert set(dims) == {m.lora_name for m in net.unet_loras}
    assert dims[name] == (5, 5.0)
    assert dims["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == (8, 3.0)
    assert dims["lora_unet_input_blocks_3_0_op"] == (2, 0.5)
    assert dims["lora_unet_input_blocks_1_0_emb_layers_1"] == (8, 3.0)
    assert inferred.conv_lora_dim == 2 and inferred.conv_alpha == 0.5
    inferred.apply_to([te1b, te2b], unetb)
    inferred.load_state_dict(weights)  # strict: the shapes and the module set match


def test_load_weights_reports_mismatches(models, tmp_path):
    te1, te2, unet = models
    net = create_network(1.0, 4, 1, None, [te1, te2], unet)
    path = tmp_path / "l.safetensors"
    net.save_weights(str(path))

    unet_only = create_network(1.0, 4, 1, None, [te1, te2], unet)
    unet_only.apply_to([te1, te2], unet, apply_text_encoder=False)
    info = unet_only.load_weights(str(path))
    assert len(info.unexpected) == 36 and not info.missing
    assert "lora_te1_text_model_encoder_layers_0_self_attn_k_proj" in str(info)
    with pytest.raises(ModelLoadError, match="does not match"):
        unet_only.load_weights(str(path), strict=True)

    other_rank = create_network(1.0, 8, 1, None, [te1, te2], unet)
    with pytest.raises(ModelLoadError, match="network_dim"):
        other_rank.load_weights(str(path))
    with pytest.raises(ModelLoadError, match="not found"):
        net.load_weights(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(ModelLoadError, match="cannot read"):
        net.load_weights(str(bad))
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
                                 "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 4)},
                                str(foreign))
    with pytest.raises(ModelLoadError, match="none of its"):
        create_network_from_weights(1.0, str(foreign), None, [te1, te2], unet)


def test_apply_to_without_text_encoder_drops_its_modules(models, tmp_path):
    te1, te2, unet = models
    net = create_network(1.0, 4, 1, None, [te1, te2], unet)
    net.apply_to([te1, te2], unet, apply_text_encoder=False, apply_unet=True)
    assert not net.text_encoder_loras
    assert not any(k.startswith("lora_te") for k in net.state_dict())
    assert "forward" not in vars(te1.encoder.layers[0].self_attn.q_proj)
    assert "forward" in vars(unet.mid_block.attentions[0].proj_in)


# ---- optimizer, arguments, metadata ----------------------------------------------------------------------------


def test_prepare_optimizer_params(models):
    te1, te2, unet = models
    net = create_network(1.0, 4, 1, None, [te1, te2], unet)
    groups, desc = net.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert desc == ["textencoder 1", "textencoder 2", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    assert sum(len(list(g["params"])) for g in groups) == len(list(net.parameters()))
    groups, desc = net.prepare_optimizer_params(None, None, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3] * 3
    groups, desc = net.prepare_optimizer_params(0, 1e-4, 1e-3)  # lr 0 freezes the text encoders
    assert desc == ["unet"]
    plus = create_network(1.0, 4, 1, None, [te1, te2], unet, loraplus_unet_lr_ratio="16")
    groups, desc = plus.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc[-2:] == ["unet", "unet plus"] and groups[-1]["lr"] == pytest.approx(1.6e-3)
    torch.optim.AdamW(groups)  # usable as is


def test_network_args_are_validated(models):
    te1, te2, unet = models
    with pytest.raises(ConfigError, match="conv_dim"):
        create_network(1.0, 4, 1, None, [te1, te2], unet, conv_dim="abc")
    with pytest.raises(ConfigError, match="rank_dropout"):
        create_network(1.0, 4, 1, None, [te1, te2], unet, rank_dropout="1.5")
    with pytest.raises(ConfigError, match="block_dims"):
        create_network(1.0, 4, 1, None, [te1, te2], unet, block_dims="2,2,2")
    net = create_network(1.0, 4, None, None, [te1, te2], unet, module_dropout="0.1")
    assert net.loras[0].module_dropout == 0.1 and float(net.loras[0].alpha) == 1.0


def test_max_norm_regularization_caps_the_update(models):
    te1, te2, unet = models
    net = create_network(1.0, 4, 4, None, [te1, te2], unet)
    randomize(net, scale=1.0)
    scaled, mean_norm, max_norm = net.apply_max_norm_regularization(1.0, "cpu")
    assert scaled > 0 and max_norm <= 1.0 + 1e-4
    assert max(float(m.delta_weight().detach().norm()) for m in net.loras) <= 1.0 + 1e-4


def test_build_ss_metadata_strings_and_keys():
    meta = build_ss_metadata(network_dim=16, network_alpha=8.0, network_args={"conv_dim": 4}, learning_rate=1e-4,
                             unet_lr=1e-4, text_encoder_lr=[1e-5, 2e-5], num_train_images=10, max_train_steps=100,
                             seed=1, resolution=(1024, 1024), mixed_precision="bf16", optimizer="AdamW",
                             lr_scheduler="constant", training_started_at=123.0, output_name="foo",
                             extra={"ss_clip_skip": None, "modelspec.title": "foo"})
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4"}
    assert meta["ss_resolution"] == "(1024, 1024)" and meta["ss_text_encoder_lr"] == "[1e-05, 2e-05]"
    assert meta["ss_training_started_at"] == "123.0" and meta["modelspec.title"] == "foo"
    saved = lora_mod.ss_metadata_for_save(meta, steps=5, epoch=1)
    assert saved["ss_steps"] == "5" and saved["ss_epoch"] == "1" and "ss_training_finished_at" in saved
    # the hashes ignore non-ss metadata and change with the tensors
    t = {"a.lora_down.weight": torch.ones(2, 2)}
    h1 = lora_mod.precalculate_safetensors_hashes(t, {"ss_x": "1", "user": "a"})
    h2 = lora_mod.precalculate_safetensors_hashes(t, {"ss_x": "1", "user": "b"})
    h3 = lora_mod.precalculate_safetensors_hashes({"a.lora_down.weight": torch.zeros(2, 2)}, {"ss_x": "1"})
    assert h1 == h2 and h1[0] != h3[0]


def test_torch_pickle_files_load_too(models, tmp_path):
    te1, te2, unet = models
    net = create_network(1.0, 4, 1, None, [te1, te2], unet)
    randomize(net)
    path = tmp_path / "l.pt"
    net.save_weights(str(path))
    assert os.path.isfile(path)
    net2 = create_network(1.0, 4, 1, None, [te1, te2], unet)
    net2.load_weights(str(path), strict=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, net2.state_dict()[k])


# ---------------------------------------------------------------------------------------------- kinds and protocol


def test_network_kinds_registry_builds_modules_of_the_kind(models):
    from library.errors import UserError
    from networks.kinds import NetworkKind, get_network_kind, network_kinds, register_network_kind

    lora_kind = get_network_kind("lora")
    assert lora_kind.module_class is LoRAModule and "lora" in network_kinds()
    with pytest.raises(UserError, match="unknown network kind 'nope'"):
        get_network_kind("nope")

    class HalfLoRA(LoRAModule):  # a new kind: its own layer module, the LoRA file layout
        pass

    kind = register_network_kind(NetworkKind("half_lora_test", HalfLoRA, lora_kind.read_shapes, lora_kind.tensor_keys))
    te1, te2, unet = models
    network = lora_mod.LoRANetwork([te1, te2], unet, lora_dim=2, kind="half_lora_test")
    assert network.loras and all(type(m) is HalfLoRA for m in network.loras)
    assert kind.matches(network.state_dict())


FAKE_NETWORK_MODULE = '''
"""A third-party kohya network module for the tests: one trainable gain on one layer, found by its SGM name."""
import json
import os

import safetensors.torch
import torch

TARGET = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"


def _log(call, **kw):
    with open(os.environ["FAKE_NET_LOG"], "a") as f:
        f.write(json.dumps({"call": call, **kw}) + "\\n")


class Net(torch.nn.Module):
    def __init__(self, text_encoder, unet):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.zeros(()))
        self._layer = [unet.get_submodule(TARGET)]  # sd-scripts' name: the module sees the SGM view
        _log("create", unet=type(unet).__name__, te=[n for n, _ in text_encoder[0].named_modules()][1])

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        layer = self._layer[0]
        org = layer.forward
        layer.forward = lambda x: org(x) * (1.0 + self.gain)
        _log("apply_to", te=apply_text_encoder, unet=apply_unet)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        return [{"params": (p for p in [self.gain]), "lr": unet_lr or default_lr}]

    def save_weights(self, file, dtype, metadata):
        safetensors.torch.save_file({"gain": self.gain.detach().clone()}, file, metadata)

    def load_weights(self, file):
        return "nothing"

    def enable_gradient_checkpointing(self):
        _log("enable_gradient_checkpointing")

    def prepare_grad_etc(self, text_encoder, unet):
        _log("prepare_grad_etc")
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        _log("on_epoch_start")
        self.train()

    def on_step_start(self, text_encoder, unet):
        _log("on_step_start")

    def get_trainable_params(self):
        return self.parameters()


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **kwargs):
    _log("create_network", dropout=kwargs.get("dropout"), neuron_dropout=kwargs.get("neuron_dropout"))
    return Net(text_encoder, unet)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    return Net(text_encoder, unet), {}
'''


def test_third_party_module_is_driven_through_the_protocol_on_the_sd_scripts_view(tmp_path, tiny_sdxl_file,
                                                                                  shapes_dataset):
    from conftest import run_script

    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "fake_net.py").write_text(FAKE_NETWORK_MODULE, encoding="utf-8")
    log = tmp_path / "calls.jsonl"
    env = {"PYTHONPATH": str(tmp_path / "mods"), "FAKE_NET_LOG": str(log)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_sdxl_file,
                       "--dataset_config", shapes_dataset["config"], "--output_dir", str(tmp_path / "out"),
                       "--output_name", "fake", "--network_module", "fake_net", "--network_dim", "4",
                       "--learning_rate", "0.1", "--max_train_steps", "2", "--gradient_checkpointing",
                       "--network_train_unet_only")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert r.returncode == 0, r.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    names = [c["call"] for c in calls]
    create = next(c for c in calls if c["call"] == "create")
    assert create["unet"] == "SdxlUNet2DConditionModel" and create["te"] == "text_model"
    assert names.index("apply_to") < names.index("prepare_grad_etc") < names.index("on_epoch_start")
    assert {"call": "apply_to", "te": False, "unet": True} in calls
    assert "enable_gradient_checkpointing" in names
    assert names.count("on_step_start") == 2  # 2 steps of one batch each
    saved = safetensors.torch.load_file(str(tmp_path / "out" / "fake.safetensors"))
    assert float(saved["gain"]) != 0.0  # the gradient reached it through the hook on our real layer


def test_continuing_without_network_dim_takes_the_shape_from_the_module(tmp_path, tiny_sdxl_file, shapes_dataset):
    from conftest import run_script

    def train(name: str, *extra: str) -> dict:
        r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_sdxl_file,
                       "--dataset_config", shapes_dataset["config"], "--output_dir", str(tmp_path / name),
                       "--output_name", "lora", "--max_train_steps", "1", "--network_train_unet_only", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        return safetensors.torch.load_file(str(tmp_path / name / "lora.safetensors"))

    first = train("first", "--network_dim", "3", "--network_args", "conv_dim=2")
    second = train("second", "--network_weights", str(tmp_path / "first" / "lora.safetensors"))
    assert second.keys() == first.keys()
    assert all(second[k].shape == first[k].shape for k in first)  # ranks 3 and 2 (conv) from the file


def test_scale_weight_norms_caps_every_module_after_each_step(tmp_path, tiny_sdxl_file, shapes_dataset):
    from conftest import run_script

    r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_sdxl_file,
                   "--dataset_config", shapes_dataset["config"], "--output_dir", str(tmp_path / "out"),
                   "--output_name", "lora", "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "0.05",
                   "--max_train_steps", "2", "--network_train_unet_only", "--scale_weight_norms", "0.01")
    assert r.returncode == 0, r.stderr[-3000:]
    sd = safetensors.torch.load_file(str(tmp_path / "out" / "lora.safetensors"))
    norms = []
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key[:-len(".lora_down.weight")]
            down, up = sd[key].flatten(1), sd[f"{name}.lora_up.weight"].flatten(1)
            norms.append(float((up @ down).norm() * sd[f"{name}.alpha"] / down.shape[0]))
    assert norms and max(norms) <= 0.01 * 1.001
    assert max(norms) > 0.005  # it trained (lr 0.05 would go far past the cap)
