"""--torch_compile / --dynamo_backend: the denoiser's blocks compiled one by one (library/train/compile.py).

Tolerance: the compiled model must match eager within 1e-5 (relative to the output's scale) in the forward and in
the LoRA gradients of one training step. With the `aot_eager` backend the graphs run the same ATen kernels as eager,
so the match is within float rounding of reordered ops; inductor fuses kernels and is checked on one FLUX block
(compiling the whole tiny U-Net with inductor takes minutes on 2 CPU cores).
"""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_inputs import flux_transformer_inputs

from library.train import compile as comp

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_sdxl():
    from library.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(0)


@pytest.fixture(scope="module")
def tiny_flux():
    from library.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(0)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the larger tensor's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _sdxl_lora(tiny, gradient_checkpointing: bool):
    from conftest import randomize_lora_up
    from networks.lora import create_network

    unet = copy.deepcopy(tiny.unet).requires_grad_(False)
    net = create_network(1.0, 4, 4.0, tiny.vae, [tiny.text_encoder1, tiny.text_encoder2], unet)
    net.apply_to([tiny.text_encoder1, tiny.text_encoder2], unet, apply_text_encoder=False, apply_unet=True)
    randomize_lora_up(net, seed=5, scale=0.1)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet, net


def _sdxl_step(unet, net) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = torch.randn(2, 4, 32, 32, generator=g)
    ehs = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    net.zero_grad(set_to_none=True)
    out = unet(x, torch.tensor([10, 500]), ehs, added_cond_kwargs=added).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters() if p.requires_grad]


def _flux_inputs(tr, seed: int = 1) -> dict:
    return flux_transformer_inputs(tr, seed=seed, batch=2, timesteps=[0.3, 0.8])


def _flux_step(tr, net) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out = tr(**_flux_inputs(tr)).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters() if p.requires_grad]


def _assert_equal_steps(eager, compiled) -> None:
    (out_e, grads_e), (out_c, grads_c) = eager, compiled
    assert _close(out_c, out_e) < TOL
    assert len(grads_e) == len(grads_c) > 0
    worst = max(_close(c, e) for c, e in zip(grads_c, grads_e))
    assert worst < TOL, worst
    assert any(g.abs().sum() > 0 for g in grads_c)  # the step did train something


def test_blocks_to_compile_are_the_outermost_blocks(tiny_sdxl, tiny_flux):
    unet_blocks = comp.blocks_to_compile(tiny_sdxl.unet)
    names = {type(b).__name__ for b in unet_blocks}
    assert names == {"ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D"}
    ids = {id(b) for b in unet_blocks}
    for b in unet_blocks:  # none is inside another
        assert not any(id(m) in ids for m in list(b.modules())[1:])
    tr = tiny_flux.transformer
    flux_blocks = comp.blocks_to_compile(tr)
    assert flux_blocks == [*tr.transformer_blocks, *tr.single_transformer_blocks]


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_compiled_sdxl_step_equals_eager(tiny_sdxl, gradient_checkpointing):
    unet, net = _sdxl_lora(tiny_sdxl, gradient_checkpointing)
    eager = _sdxl_step(unet, net)
    result = comp.compile_denoiser_blocks(unet, "aot_eager")
    assert result.backend == "aot_eager" and result.blocks == len(comp.blocks_to_compile(unet)) > 0
    assert all(getattr(b, "_kohya_compiled", False) for b in comp.blocks_to_compile(unet))
    _assert_equal_steps(eager, _sdxl_step(unet, net))
    state_keys = set(unet.state_dict())
    assert not any("_orig_mod" in k for k in state_keys)  # the model and its keys are unchanged
    comp.uncompile_blocks(comp.blocks_to_compile(unet))
    assert not any(getattr(b, "_kohya_compiled", False) for b in comp.blocks_to_compile(unet))


def test_compiled_flux_step_equals_eager_with_block_swap(tiny_flux):
    from conftest import flux_lora_model
    from library.models.lowvram import BlockSwapper

    tr, net = flux_lora_model(tiny_flux)
    eager = _flux_step(tr, net)
    comp.compile_denoiser_blocks(tr, "aot_eager")
    _assert_equal_steps(eager, _flux_step(tr, net))
    swapper = BlockSwapper.attach(tr, 2, "cpu")  # hooks stay outside the compiled forwards
    try:
        _assert_equal_steps(eager, _flux_step(tr, net))
    finally:
        swapper.detach()


def test_inductor_flux_block_equals_eager(tiny_flux):
    """One FLUX single block through inductor (fused kernels), forward and input gradients."""
    if comp.backend_problem("inductor"):
        pytest.skip("inductor cannot compile on this machine (no C++ compiler?)")
    tr = copy.deepcopy(tiny_flux.transformer).requires_grad_(False)
    block = tr.single_transformer_blocks[0]
    dim = tr.config.num_attention_heads * tr.config.attention_head_dim
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 16, dim, generator=g, requires_grad=True)
    text = torch.randn(1, 8, dim, generator=g)
    temb = torch.randn(1, dim, generator=g)
    rope = tr.pos_embed(torch.zeros(24, 3))

    def run():
        hidden.grad = None
        text_out, out = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
        (out.square().mean() + text_out.square().mean()).backward()
        return out.detach(), [hidden.grad.clone()]

    eager = run()
    comp.compile_blocks([block], "inductor")
    _assert_equal_steps(eager, run())


def test_missing_backend_warns_once_and_stays_eager(tiny_flux, capsys):
    from library.config import environment_flags

    environment_flags._SAID.clear()
    tr = copy.deepcopy(tiny_flux.transformer)
    result = comp.compile_denoiser_blocks(tr, "nvprims_nvfuser")
    assert result.backend is None and result.blocks == 0 and "nvprims_nvfuser" in result.reason
    assert not any(getattr(b, "_kohya_compiled", False) for b in comp.blocks_to_compile(tr))
    err = capsys.readouterr().err
    assert err.count("warning: --torch_compile") == 1 and "eager" in err


def test_sdxl_script_with_torch_compile_trains_like_eager(tmp_path, tiny_sdxl_file, shapes_dataset):
    """2 steps of sdxl_train_network.py with --torch_compile: the same losses as without, within the tolerance.
    (aot_eager: the whole compile path, dynamo and AOTAutograd, without minutes of C++ builds on a CPU.)"""
    from conftest import run_script
    from test_train_sdxl_network import read_losses, run_toml

    runs = {}
    for name, extra in (("eager", {}), ("compiled", {"torch_compile": True, "dynamo_backend": "aot_eager"})):
        cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], name=name, network_train_unet_only=True,
                       output_dir=str(tmp_path / name), **extra)
        r = run_script("sdxl_train_network.py", "--config_file", cfg)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / name / "lora.safetensors").is_file()
        runs[name] = (read_losses(tmp_path / f"{name}_loss.jsonl"), r.stdout + r.stderr)
    assert "blocks of the UNet2DConditionModel compiled with aot_eager" in runs["compiled"][1]
    assert "compiled with" not in runs["eager"][1]
    eager, compiled = runs["eager"][0], runs["compiled"][0]
    assert len(eager) == len(compiled) == 2
    for a, b in zip(compiled, eager):
        assert abs(a - b) <= TOL * max(1.0, abs(b)), (compiled, eager)


def test_flux_script_with_torch_compile_matches_the_stored_losses(tmp_path, tiny_flux_single):
    from conftest import build_shapes_dataset, run_script
    from test_flux_train import REGRESSION_FILE, REGRESSION_STEPS, flux_toml, read_losses

    import json
    import math

    ds = build_shapes_dataset(tmp_path)
    cfg = flux_toml(tmp_path, tiny_flux_single, ds["config"], max_train_steps=REGRESSION_STEPS, torch_compile=True,
                    dynamo_backend="aot_eager")
    r = run_script("flux_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "blocks of the FluxTransformer2DModel compiled with aot_eager" in r.stdout + r.stderr
    stored = json.loads(REGRESSION_FILE.read_text())["losses"]
    for got, want in zip(read_losses(tmp_path / "run_loss.jsonl"), stored, strict=True):
        assert math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-5)


def test_unknown_backend_in_a_script_run_warns_and_trains(tmp_path, tiny_sdxl_file, shapes_dataset):
    from conftest import run_script
    from test_train_sdxl_network import run_toml

    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=1, network_train_unet_only=True,
                   torch_compile=True, dynamo_backend="ipex")
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("warning: --torch_compile: torch") == 1 and "'ipex'" in r.stderr
    assert (tmp_path / "out" / "lora.safetensors").is_file()
