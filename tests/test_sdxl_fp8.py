"""SDXL --fp8_base / --fp8_base_unet (library/families/sdxl_placement.py over library/models/lowvram.py): which
layers go to fp8, that the U-Net's output stays close to its bf16 output, LoRA (incl. conv LoRA) and LLLite on fp8
layers, and the trainer end to end (sd-scripts' rule: fp8 needs mixed precision)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open

from conftest import run_script
from test_train_sdxl_network import read_losses, run_toml

from library.families.sdxl_placement import apply_sdxl_fp8
from library.models.lowvram import Fp8Conv2d, Fp8Linear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from library.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(0)


def _unet_inputs(unet, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 8, cfg.cross_attention_dim, generator=g)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim  # CLIP-G's pooled width
    added = {"text_embeds": torch.randn(1, pooled, generator=g),
             "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}
    return x, torch.tensor([500]), ctx, added


def _bf16(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(torch.bfloat16).requires_grad_(False)


def test_fp8_base_stores_the_unet_blocks_and_text_encoder_layers_in_fp8(tiny):
    unet, te1, te2 = _bf16(tiny.unet), _bf16(tiny.text_encoder1), _bf16(tiny.text_encoder2)
    n = apply_sdxl_fp8(unet, [te1, te2], fp8_base=True, fp8_base_unet=False)
    assert n > 0
    blocks = [unet.down_blocks, unet.mid_block, unet.up_blocks]
    layers = [m for b in blocks for m in b.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and all(isinstance(m, (Fp8Linear, Fp8Conv2d)) for m in layers)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert any(isinstance(m, Fp8Conv2d) for m in layers) and any(isinstance(m, Fp8Linear) for m in layers)
    # the input / output convolutions and the embeddings stay in the compute dtype, so unet.dtype is still bf16
    assert unet.conv_in.weight.dtype == torch.bfloat16 and unet.conv_out.weight.dtype == torch.bfloat16
    assert unet.dtype == torch.bfloat16
    for te in (te1, te2):
        linears = [m for name, m in te.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
        assert linears and all(isinstance(m, Fp8Linear) for m in linears)
        emb = te.get_input_embeddings()
        assert emb.weight.dtype == torch.bfloat16  # embeddings are never fp8 (as sd-scripts)


def test_fp8_base_unet_leaves_the_text_encoders_alone(tiny):
    unet, te1 = _bf16(tiny.unet), _bf16(tiny.text_encoder1)
    apply_sdxl_fp8(unet, [te1], fp8_base=False, fp8_base_unet=True)
    assert isinstance(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q, Fp8Linear)
    assert not any(isinstance(m, Fp8Linear) for m in te1.modules())
    assert apply_sdxl_fp8(_bf16(tiny.unet), [], fp8_base=False, fp8_base_unet=False) == 0  # off: nothing changes


def test_fp8_unet_output_is_close_to_bf16_and_takes_lora_and_lllite(tiny):
    from networks import control_net_lllite as lllite
    from networks.lora import create_network

    ref = _bf16(tiny.unet)
    fp8 = copy.deepcopy(ref)
    apply_sdxl_fp8(fp8, [], fp8_base=True, fp8_base_unet=False)
    x, t, ctx, added = _unet_inputs(ref)
    args = (x.bfloat16(), t, ctx.bfloat16())
    added = {k: v.bfloat16() for k, v in added.items()}
    with torch.no_grad():
        want = ref(*args, added_cond_kwargs=added).sample.float()
        got = fp8(*args, added_cond_kwargs=added).sample.float()
    rel = float((got - want).norm() / want.norm())
    assert torch.isfinite(got).all() and 0 < rel < 0.1, rel  # fp8 rounding, not a different model
    # a LoRA with conv modules (LoCon) trains on the fp8 layers: gradients reach its weights only
    net = create_network(1.0, 4, 4.0, None, [], fp8, conv_dim=4, conv_alpha=4)
    net.apply_to([], fp8, apply_text_encoder=False, apply_unet=True)
    assert any(isinstance(m.org_module, Fp8Conv2d) for m in net.unet_loras)
    for m in net.unet_loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.01)
    net.to(torch.bfloat16)
    out = fp8(*args, added_cond_kwargs=added).sample
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert all(p.grad is None for p in fp8.parameters())
    net.restore()
    # ControlNet-LLLite hooks the fp8 attention projections (forward pre-hooks)
    control = lllite.create_network(fp8, 8, 8, 0.0, 1.0)
    control.apply_to()
    control.to(torch.bfloat16)
    control.set_cond_image(torch.rand(1, 3, 128, 128, dtype=torch.bfloat16))
    with torch.no_grad():
        assert torch.isfinite(fp8(*args, added_cond_kwargs=added).sample).all()


def test_sdxl_train_network_with_fp8_base_trains_close_to_bf16(tmp_path, tiny_sdxl_file, shapes_dataset):
    losses = {}
    for name, extra in (("bf16", []), ("fp8", ["--fp8_base"])):
        cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], name=name, mixed_precision="bf16",
                       output_dir=str(tmp_path / name))
        r = run_script("sdxl_train_network.py", "--config_file", cfg, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = read_losses(tmp_path / f"{name}_loss.jsonl")
    assert len(losses["fp8"]) == 2 and all(math.isfinite(v) for v in losses["fp8"])
    assert losses["fp8"] != losses["bf16"]  # the weights really were fp8
    for a, b in zip(losses["fp8"], losses["bf16"]):
        assert math.isclose(a, b, rel_tol=0.1), (losses["fp8"], losses["bf16"])
    with safe_open(str(tmp_path / "fp8" / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_fp8_base"] == "True" and md["ss_fp8_base_unet"] == "False"


def test_fp8_without_mixed_precision_is_sd_scripts_error(tmp_path, tiny_sdxl_file, shapes_dataset):
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"])
    for script, flag in (("sdxl_train_network.py", "--fp8_base_unet"), ("sdxl_train_control_net_lllite.py",
                                                                          "--fp8_base")):
        r = run_script(script, "--config_file", cfg, flag)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"{flag} requires --mixed_precision fp16 or bf16" in r.stderr


def test_fp8_is_refused_with_fsdp_sharding_for_sdxl_too():
    from types import SimpleNamespace

    from library.config.model_flags import ModelConfig
    from library.errors import UserError
    from library.train.scale_out import ShardingOptions, check_sharding_compatible

    cfg = SimpleNamespace(model=ModelConfig(fp8_base_unet=True), validation=SimpleNamespace(evaluates=False))
    with pytest.raises(UserError, match="cannot be combined with --fp8_base"):
        check_sharding_compatible(ShardingOptions(), cfg)
    check_sharding_compatible(ShardingOptions(), SimpleNamespace(model=ModelConfig(),
                                                                 validation=SimpleNamespace(evaluates=False)))
