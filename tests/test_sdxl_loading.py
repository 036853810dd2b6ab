"""SDXL loading from single files and diffusers folders, saving, error messages and tokenizers (tiny models)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import ModelLoadError
from library.models.sdxl_loader import CONFIG_METADATA_KEY, SDXLModels, load_sdxl, save_sdxl_single_file
from library.models.tiny import build_tiny_sdxl, sdxl_scheduler
from library.models.tokenizers import load_sdxl_tokenizers

PARTS = ("unet", "vae", "text_encoder1", "text_encoder2")


@pytest.fixture(scope="module")
def reference() -> SDXLModels:
    return build_tiny_sdxl(seed=0)


def _assert_same_weights(a: SDXLModels, b: SDXLModels) -> None:
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert set(sa) == set(sb), part
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, (part, key)
            assert torch.equal(sa[key], sb[key]), (part, key)


def _plain(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def test_single_file_has_official_key_names(tiny_sdxl_file):
    with safe_open(tiny_sdxl_file, "pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()[CONFIG_METADATA_KEY])["unet"]["norm_num_groups"] == 16
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "first_stage_model.decoder.up.3.block.2.conv2.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.ln_final.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith(("model.diffusion_model.down_blocks", "first_stage_model.encoder.down_blocks")) for k in keys)
    q = load_file(tiny_sdxl_file)["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == (32, 32, 1, 1)  # LDM's 1x1 conv layout


def test_single_file_round_trip_is_bit_identical(reference, tiny_sdxl_file):
    loaded = load_sdxl(tiny_sdxl_file)
    _assert_same_weights(reference, loaded)
    assert _plain(loaded.unet.config) == _plain(reference.unet.config)
    assert _plain(loaded.vae.config) == _plain(reference.vae.config)
    for part in ("text_encoder1", "text_encoder2"):
        assert getattr(loaded, part).config.to_dict() == getattr(reference, part).config.to_dict()
    assert loaded.tokenizer2.pad_token == "!" and loaded.tokenizer1.pad_token == "<|endoftext|>"


def test_save_and_reload_single_file_keeps_tensors_and_metadata(reference, tmp_path):
    path = tmp_path / "again.safetensors"
    save_sdxl_single_file(reference, str(path), metadata={"ss_note": "hello"})
    assert sorted(os.listdir(tmp_path)) == ["again.safetensors"]  # no temp file left behind
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_note"] == "hello"
    _assert_same_weights(reference, load_sdxl(str(path)))


def test_diffusers_folder_loads_same_weights(reference, tiny_sdxl_folder):
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_sdxl_folder, sub)), sub
    loaded = load_sdxl(tiny_sdxl_folder)
    _assert_same_weights(reference, loaded)  # same seed -> same weights in both formats
    assert loaded.tokenizer2.pad_token == "!"


def test_diffusers_pipeline_from_pretrained_loads_folder(reference, tiny_sdxl_folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    assert torch.equal(pipe.unet.conv_in.weight, reference.unet.conv_in.weight)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_different_seed_gives_different_weights():
    a, b = build_tiny_sdxl(seed=0), build_tiny_sdxl(seed=1)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert torch.equal(a.unet.conv_in.weight, build_tiny_sdxl(seed=0).unet.conv_in.weight)


def test_pipeline_runs_on_loaded_single_file(tiny_sdxl_file):
    m = load_sdxl(tiny_sdxl_file)
    pipe = StableDiffusionXLPipeline(
        vae=m.vae, text_encoder=m.text_encoder1, text_encoder_2=m.text_encoder2, tokenizer=m.tokenizer1,
        tokenizer_2=m.tokenizer2, unet=m.unet, scheduler=sdxl_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


def test_missing_keys_are_named_and_counted(tiny_sdxl_file, tmp_path):
    sd = load_file(tiny_sdxl_file)
    with safe_open(tiny_sdxl_file, "pt") as f:
        meta = f.metadata()
    dropped = [
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "first_stage_model.decoder.up.0.block.1.conv1.bias",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias",
    ]
    for key in dropped:
        del sd[key]
    bad = tmp_path / "broken.safetensors"
    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(ModelLoadError) as info:
        load_sdxl(str(bad))
    message = str(info.value)
    assert str(bad) in message and "3 key(s) missing" in message
    for key in dropped:
        assert key in message


def test_missing_structural_key_names_it(tiny_sdxl_file, tmp_path):
    sd = load_file(tiny_sdxl_file)
    del sd["model.diffusion_model.input_blocks.0.0.weight"]
    bad = tmp_path / "no_conv_in.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ModelLoadError, match="conv_in.weight"):
        load_sdxl(str(bad))


def test_file_without_config_metadata_loads_with_inferred_config(reference, tiny_sdxl_file, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(tiny_sdxl_file), str(plain))  # no metadata: shapes + SDXL defaults
    loaded = load_sdxl(str(plain))
    _assert_same_weights(reference, loaded)
    assert list(loaded.unet.config.block_out_channels) == [32, 64, 64]
    assert list(loaded.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "FLUX"),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"], "1.x"),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"], "1.x"),
        (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "diffusers U-Net"),
    ],
)
def test_wrong_family_is_refused(tmp_path, keys, expected):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    with pytest.raises(ModelLoadError) as info:
        load_sdxl(str(path))
    assert str(path) in str(info.value) and expected in str(info.value)


def test_pickle_checkpoint_needs_allow_pickle(reference, tiny_sdxl_file, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(tiny_sdxl_file)}, str(ckpt))
    with pytest.raises(ModelLoadError, match="--allow_pickle"):
        load_sdxl(str(ckpt))
    loaded = load_sdxl(str(ckpt), allow_pickle=True)  # no metadata: inferred config, same tensors
    _assert_same_weights(reference, loaded)


def test_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_sdxl(str(tmp_path / "nope.safetensors"))
    (tmp_path / "folder" / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        load_sdxl(str(tmp_path / "folder"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="corrupt.safetensors"):
        load_sdxl(str(corrupt))


@pytest.mark.parametrize("fmt", ["single_file", "diffusers"])
def test_dtype_is_applied(fmt, request):
    loaded = load_sdxl(request.getfixturevalue("tiny_sdxl_file" if fmt == "single_file" else "tiny_sdxl_folder"),
                       dtype=torch.bfloat16)
    for part in PARTS:
        assert all(p.dtype == torch.bfloat16 for p in getattr(loaded, part).parameters()), part


def test_shipped_tokenizers_match_clip_ids(tmp_path):
    tok1, tok2 = load_sdxl_tokenizers()
    assert tok1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok1.pad_token_id == 49407 and tok2.pad_token_id == 0
    padded = tok2("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[4:] == [0] * 73
    # a tokenizer_cache_dir with its own tokenizer wins over the shipped one
    tok1.save_pretrained(str(tmp_path / "tokenizer"))
    cached1, _ = load_sdxl_tokenizers(None, str(tmp_path))
    assert cached1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_real_sdxl_shapes_infer_the_published_config():
    """On meta tensors (no memory): the published SDXL base config survives SGM conversion and shape inference."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models import sdxl_keys
    from library.models.sdxl_loader import infer_text_config, infer_unet_config, infer_vae_config

    unet_cfg = dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128,
    )
    vae_cfg = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024)
    te1_cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             hidden_act="quick_gelu")
    te2_cfg = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             hidden_act="gelu", projection_dim=1280)
    with init_empty_weights():
        models = [UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg), CLIPTextModel(te1_cfg),
                  CLIPTextModelWithProjection(te2_cfg)]
    sgm = sdxl_keys.diffusers_to_sgm_state_dict(*(m.state_dict() for m in models))
    assert "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight" in sgm
    assert "model.diffusion_model.output_blocks.0.1.transformer_blocks.9.ff.net.2.weight" in sgm
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in sgm
    parts = sdxl_keys.sgm_to_diffusers_state_dicts(sgm)
    te2 = infer_text_config(parts["te2"], "te2", {})
    unet = infer_unet_config(parts["unet"], te2.projection_dim, {})
    assert unet["attention_head_dim"] == [5, 10, 20] and unet["transformer_layers_per_block"] == [1, 2, 10]
    assert unet["norm_num_groups"] == 32 and unet["addition_time_embed_dim"] == 256
    assert unet["cross_attention_dim"] == 2048 and "reverse_transformer_layers_per_block" not in unet
    vae = infer_vae_config(parts["vae"], {})
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["norm_num_groups"] == 32
    te1 = infer_text_config(parts["te1"], "te1", {})
    assert (te1.num_attention_heads, te1.num_hidden_layers, te1.hidden_act) == (12, 12, "quick_gelu")
    assert (te2.num_attention_heads, te2.num_hidden_layers, te2.projection_dim) == (20, 32, 1280)
