"""FLUX files: tiny models in both formats, BFL key table, loaders and their error messages."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import ModelLoadError
from library.models import flux_keys
from library.models.flux_loader import load_flux_files
from library.models.tiny_flux import build_tiny_flux

PARTS = ("transformer", "ae", "clip_l", "t5")


def _assert_same_weights(a, b) -> None:
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert set(sa) == set(sb), part
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}: {k}"


def test_both_formats_load_the_seeded_weights(tiny_flux_single, tiny_flux_diffusers):
    reference = build_tiny_flux(0)
    single = load_flux_files(tiny_flux_single)
    folder = load_flux_files(tiny_flux_diffusers)
    _assert_same_weights(reference, single)
    _assert_same_weights(reference, folder)
    assert single.tokenizer_t5("a red circle").input_ids == folder.tokenizer_t5("a red circle").input_ids
    assert single.tokenizer_clip("a red circle").input_ids == folder.tokenizer_clip("a red circle").input_ids
    assert single.transformer.config.axes_dims_rope == (4, 6, 6) and single.transformer.config.guidance_embeds
    assert single.ae.config.shift_factor == pytest.approx(0.1159) and single.ae.config.latent_channels == 16
    # the single-file flags replace the folder's components
    mixed = load_flux_files(tiny_flux_diffusers, ae=f"{tiny_flux_single}/ae.safetensors")
    assert torch.equal(mixed.ae.decoder.conv_out.weight, reference.ae.decoder.conv_out.weight)


def test_seed_decides_the_weights():
    a, b, c = build_tiny_flux(0), build_tiny_flux(0), build_tiny_flux(1)
    _assert_same_weights(a, b)
    assert not torch.equal(a.transformer.x_embedder.weight, c.transformer.x_embedder.weight)


def test_diffusers_folder_is_a_flux_pipeline(tiny_flux_diffusers):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_diffusers)
    assert pipe.transformer.config.num_single_layers == 2 and pipe.vae.config.latent_channels == 16


def test_single_file_has_the_bfl_layout(tiny_flux_single):
    sd = load_file(f"{tiny_flux_single}/flux.safetensors")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    hidden = 32
    assert shapes["double_blocks.0.img_attn.qkv.weight"] == (3 * hidden, hidden)
    assert shapes["double_blocks.1.txt_attn.qkv.bias"] == (3 * hidden,)
    assert shapes["single_blocks.1.linear1.weight"] == (3 * hidden + 4 * hidden, hidden)
    assert shapes["single_blocks.0.linear2.weight"] == (hidden, hidden + 4 * hidden)
    for key in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.out_layer.bias",
                "guidance_in.in_layer.weight", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight",
                "double_blocks.0.img_mod.lin.weight", "double_blocks.0.txt_mlp.2.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.modulation.lin.weight",
                "single_blocks.0.norm.key_norm.scale"):
        assert key in shapes, key
    assert not any(k.startswith(("transformer_blocks", "x_embedder")) for k in sd)
    ae = load_file(f"{tiny_flux_single}/ae.safetensors")
    assert "encoder.down.0.block.0.norm1.weight" in ae and "decoder.up.3.block.2.conv2.weight" in ae
    assert "encoder.mid.attn_1.q.weight" in ae and not any("quant_conv" in k for k in ae)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in load_file(f"{tiny_flux_single}/clip_l.safetensors")
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in load_file(f"{tiny_flux_single}/t5xxl.safetensors")


def test_key_table_splits_fuses_and_swaps_like_diffusers():
    """The diffusers tensors come out where diffusers' own converter puts them (checked on known rows)."""
    model = build_tiny_flux(0).transformer
    dsd = model.state_dict()
    bfl = flux_keys.diffusers_to_bfl(dsd)
    q, k, v = (dsd[f"transformer_blocks.0.attn.{n}.weight"] for n in ("to_q", "to_k", "to_v"))
    assert torch.equal(bfl["double_blocks.0.img_attn.qkv.weight"], torch.cat([q, k, v]))
    mlp = dsd["single_transformer_blocks.1.proj_mlp.bias"]
    assert torch.equal(bfl["single_blocks.1.linear1.bias"][-mlp.shape[0]:], mlp)
    scale, shift = dsd["norm_out.linear.weight"].chunk(2)
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    assert torch.equal(bfl["txt_in.weight"], dsd["context_embedder.weight"])
    # the inverse is exact, also with a ComfyUI-style prefix
    back = flux_keys.bfl_to_diffusers({"model.diffusion_model." + k: t for k, t in bfl.items()})
    assert set(back) == set(dsd) and all(torch.equal(back[k], dsd[k]) for k in dsd)


def test_missing_and_unknown_keys_name_the_file_and_count(tiny_flux_single, tmp_path):
    sd = load_file(f"{tiny_flux_single}/flux.safetensors")
    for key in ("double_blocks.1.img_attn.qkv.weight", "single_blocks.0.linear2.bias"):
        del sd[key]
    broken = tmp_path / "broken.safetensors"
    save_file(sd, str(broken))
    with pytest.raises(ModelLoadError) as e:
        load_flux_files(str(broken), ae=f"{tiny_flux_single}/ae.safetensors",
                        clip_l=f"{tiny_flux_single}/clip_l.safetensors", t5xxl=f"{tiny_flux_single}/t5xxl.safetensors")
    msg = str(e.value)
    assert "broken.safetensors" in msg and "2 key(s) missing" in msg and "double_blocks.1.img_attn.qkv.weight" in msg

    sd = load_file(f"{tiny_flux_single}/flux.safetensors")
    sd["double_blocks.0.lora_thing.weight"] = torch.zeros(1)
    save_file(sd, str(broken))
    with pytest.raises(ModelLoadError, match=r"1 key\(s\) this loader does not know.*lora_thing"):
        load_flux_files(str(broken), ae=f"{tiny_flux_single}/ae.safetensors",
                        clip_l=f"{tiny_flux_single}/clip_l.safetensors", t5xxl=f"{tiny_flux_single}/t5xxl.safetensors")


def test_wrong_or_missing_files_are_clear_errors(tiny_flux_single, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(f"{tiny_flux_single}/flux.safetensors", alone / "model.safetensors")
    with pytest.raises(ModelLoadError, match="--ae is required"):
        load_flux_files(str(alone / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="not the FLUX autoencoder"):
        load_flux_files(str(alone / "model.safetensors"), ae=f"{tiny_flux_single}/flux.safetensors")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_flux_files(str(tmp_path / "nope.safetensors"))
    save_file({"conditioner.embedders.0.x": torch.zeros(1), "model.diffusion_model.input_blocks.0.0.weight":
               torch.zeros(1)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ModelLoadError, match="SDXL checkpoint, not FLUX"):
        load_flux_files(str(tmp_path / "sdxl.safetensors"))
    # no T5 tokenizer next to the files and no --tokenizer_cache_dir
    with pytest.raises(ModelLoadError, match="no T5 tokenizer found.*--tokenizer_cache_dir"):
        load_flux_files(str(alone / "model.safetensors"), ae=f"{tiny_flux_single}/ae.safetensors",
                        clip_l=f"{tiny_flux_single}/clip_l.safetensors", t5xxl=f"{tiny_flux_single}/t5xxl.safetensors")
    models = load_flux_files(str(alone / "model.safetensors"), ae=f"{tiny_flux_single}/ae.safetensors",
                             clip_l=f"{tiny_flux_single}/clip_l.safetensors",
                             t5xxl=f"{tiny_flux_single}/t5xxl.safetensors", tokenizer_cache_dir=tiny_flux_single)
    assert len(models.tokenizer_t5) > 10


def test_config_metadata_is_written(tiny_flux_single):
    with safe_open(f"{tiny_flux_single}/flux.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["flux_config"])
    assert meta["transformer"]["axes_dims_rope"] == [4, 6, 6]
