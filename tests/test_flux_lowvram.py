"""--fp8_base and --blocks_to_swap (library/models/lowvram.py) on the CPU: fp8 numerics and memory, LoRA on fp8
layers, the block swapper's hook order and its exactness under gradient checkpointing, and the scripts end to end
with --fp8_base. Block swapping's device copies themselves need a GPU: here the compute device is the CPU (the
blocks still go through their host buffers and the slots), so the tests check the order of moves and that swapping
changes no number; the schedule and the stream events are tested in tests/test_block_swap_schedule.py."""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_inputs import flux_transformer_inputs
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import build_shapes_dataset, flux_lora_model, run_script  # noqa: E402

from library.errors import UserError  # noqa: E402
from library.models.lowvram import BlockSwapper, Fp8Linear, apply_fp8_linear, linear_weight_bytes  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from library.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(0)


def _inputs(tr, seed: int = 0) -> dict:
    return flux_transformer_inputs(tr, seed=seed)


def _cast(d: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) for k, v in d.items()}


def _block_linears(tr, include_scales: bool = True) -> int:
    return sum(linear_weight_bytes(blocks, include_scales)
               for blocks in (tr.transformer_blocks, tr.single_transformer_blocks))


# ------------------------------------------------------------------------------------------------------------ fp8
def test_fp8_base_halves_linear_memory_and_stays_close_to_bf16(tiny):
    ref = copy.deepcopy(tiny.transformer).to(torch.bfloat16).requires_grad_(False)
    fp8 = copy.deepcopy(ref)
    n = apply_fp8_linear(fp8, torch.bfloat16)
    assert n > 0 and isinstance(fp8.transformer_blocks[0].attn.to_q, Fp8Linear)
    assert fp8.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert fp8.x_embedder.weight.dtype == torch.bfloat16  # embedders stay in the compute dtype
    assert 2 * _block_linears(fp8, include_scales=False) == _block_linears(ref)  # 1 byte per weight vs 2
    # plus a float32 scale per output row: 4 / in_features of the weights (12.5% here, 0.1% for FLUX's 3072)
    assert _block_linears(fp8) <= 0.5 * (1 + 4 / 32) * _block_linears(ref)
    # a later dtype cast of the whole model must not undo or corrupt the fp8 storage
    fp8.to(torch.bfloat16)
    assert fp8.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert fp8.transformer_blocks[0].attn.to_q.weight_scale.dtype == torch.float32
    x = _cast(_inputs(ref), torch.bfloat16)
    with torch.no_grad():
        want = ref(**x).sample.float()
        got = fp8(**x).sample.float()
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.05, rel


def test_lora_trains_on_fp8_layers_and_must_come_after(tiny):
    from networks.lora_flux import create_network

    tr = copy.deepcopy(tiny.transformer).to(torch.bfloat16).requires_grad_(False)
    apply_fp8_linear(tr, torch.bfloat16)
    net = create_network(1.0, 4, 4.0, tiny.ae, [tiny.clip_l, tiny.t5], tr, train_blocks="all")
    net.apply_to([tiny.clip_l, tiny.t5], tr, apply_text_encoder=False, apply_unet=True)
    for lora in net.loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    with torch.autocast("cpu", torch.bfloat16):
        out = tr(**_inputs(tr)).sample
    out.float().square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().max()) > 0 for g in grads)
    # the other order: a layer whose forward a network already replaced is refused, not silently mis-cast
    other = copy.deepcopy(tiny.transformer).requires_grad_(False)
    net2 = create_network(1.0, 4, 4.0, tiny.ae, [tiny.clip_l, tiny.t5], other)
    net2.apply_to([tiny.clip_l, tiny.t5], other, apply_text_encoder=False, apply_unet=True)
    with pytest.raises(UserError, match="fp8 must be applied first"):
        apply_fp8_linear(other, torch.float32)


# ------------------------------------------------------------------------------------------------- block swapping
def _step(tr, net) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out = tr(**_inputs(tr, seed=1)).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters() if p.requires_grad]


def test_block_swapper_is_exact_and_moves_blocks_in_order_under_checkpointing(tiny):
    """The swapper's moves through the real hooks (the schedule and its streams: tests/test_block_swap_schedule.py).
    Without prefetching a block comes in when it runs and leaves when another one needs the slot; the last forward
    block stays for the backward, which re-runs the blocks last to first."""
    tr, net = flux_lora_model(tiny)
    want_out, want_grads = _step(tr, net)

    swapper = BlockSwapper.attach(tr, 3, "cpu", record=True, prefetch=0)  # double 1, single 0, single 1
    assert swapper.blocks == [tr.transformer_blocks[1], *tr.single_transformer_blocks]
    seen = []
    for i, block in enumerate(swapper.blocks):  # registered after the swapper's: runs once the block is in
        block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, swapper._resident == [i])))
    got_out, got_grads = _step(tr, net)
    assert torch.equal(got_out, want_out)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g, w)
    assert seen == [(0, True), (1, True), (2, True), (2, True), (1, True), (0, True)]
    forward = [("in", 0), ("out", 0), ("in", 1), ("out", 1), ("in", 2)]
    backward = [("out", 2), ("in", 1), ("out", 1), ("in", 0)]  # block 2's recompute found it in
    assert swapper.events == forward + backward
    assert swapper._resident == [0]  # the next step's first block
    swapper.offload_all()
    assert swapper.events[-1] == ("out", 0) and swapper._resident == []

    swapper.events.clear()
    with torch.no_grad():  # inference: one block at a time, the last one left in for the next call
        tr.eval()
        tr(**_inputs(tr))
    assert swapper.events == forward
    swapper.detach()  # hooks gone: a further run records nothing
    swapper.events.clear()
    with torch.no_grad():
        tr(**_inputs(tr))
    assert swapper.events == []


def test_block_swapper_prefetches_one_block_by_default(tiny):
    tr, net = flux_lora_model(tiny)
    want_out, want_grads = _step(tr, net)
    swapper = BlockSwapper.attach(tr, 3, "cpu", record=True)
    assert swapper.prefetch == 1 and len(swapper._slots) == 2
    for _ in range(2):
        got_out, got_grads = _step(tr, net)
        assert torch.equal(got_out, want_out)
        assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads, strict=True))
    # step 1: 0 and 1 before block 0 runs, 2 while 1 runs; the forward's last block and the one before it are the
    # backward's first two; block 0 comes in while 1 is recomputed. Step 2 finds 0 and 1 in already.
    step1 = [("in", 0), ("in", 1), ("out", 0), ("in", 2), ("out", 2), ("in", 0)]
    step2 = [("out", 0), ("in", 2), ("out", 2), ("in", 0)]
    assert swapper.events == step1 + step2
    assert len(swapper._resident) == 2


def test_block_swap_flags_are_checked(tiny):
    from library.config.flux_config import FluxConfig
    from library.families.flux_placement import apply_low_vram

    tr = copy.deepcopy(tiny.transformer).requires_grad_(False)
    with pytest.raises(UserError, match="--blocks_to_swap 9: expected 1 to 4"):
        BlockSwapper.attach(tr, 9, "cpu")
    with pytest.raises(UserError, match="needs --gradient_checkpointing"):
        apply_low_vram(tr, FluxConfig(blocks_to_swap=1), torch.device("cpu"), gradient_checkpointing=False)
    # the family hook the loop calls after casting the base models: fp8 lands on the transformer
    from library.config.flux_config import FluxModelConfig
    from library.families.flux import FluxFamily, FluxFamilyModels

    family = FluxFamily(FluxModelConfig(flux=FluxConfig(fp8_base=True)))
    models = FluxFamilyModels(denoiser=tr.to(torch.bfloat16), vae=torch.nn.Identity())
    family.after_base_models_prepared(models, SimpleNamespace(training=SimpleNamespace(gradient_checkpointing=False)),
                                      torch.device("cpu"))
    assert isinstance(tr.single_transformer_blocks[0].proj_out, Fp8Linear) and models.block_swapper is None


def test_swapped_blocks_never_visit_the_device_at_load_time(tiny):
    """prepare_base_models casts on the CPU, then moves everything but the swapped blocks: the device never holds
    the whole model (nor an fp32 copy of it). The meta device stands in for a GPU: whatever is moved there shows."""
    from library.config.flux_config import FluxConfig, FluxModelConfig
    from library.families.flux import FluxFamily, FluxFamilyModels
    from library.train.loop import prepare_base_models

    tr = copy.deepcopy(tiny.transformer)
    models = FluxFamilyModels(denoiser=tr, vae=torch.nn.Linear(2, 2))
    cfg = SimpleNamespace(model=SimpleNamespace(no_half_vae=False),
                          training=SimpleNamespace(xformers=False, gradient_checkpointing=True),
                          environment=SimpleNamespace(cpu_offload_checkpointing=False))
    family = FluxFamily(FluxModelConfig(flux=FluxConfig(blocks_to_swap=3)))
    kept = family.modules_kept_off_device(models, cfg)
    assert kept == [tr.transformer_blocks[1], *tr.single_transformer_blocks]
    family.after_base_models_prepared = lambda *a: None  # the swapper itself needs CUDA; placement is under test
    prepare_base_models(cfg, family, models, torch.device("meta"), torch.bfloat16)
    kept_ids = {id(p) for m in kept for p in m.parameters()}
    for name, p in tr.named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert p.device.type == ("cpu" if id(p) in kept_ids else "meta"), name
    assert {b.device.type for _, b in tr.named_buffers()} <= {"meta"}
    # without swapping everything moves
    tr2 = copy.deepcopy(tiny.transformer)
    models2 = FluxFamilyModels(denoiser=tr2, vae=torch.nn.Linear(2, 2))
    prepare_base_models(cfg, FluxFamily(), models2, torch.device("meta"), torch.bfloat16)
    assert {p.device.type for p in tr2.parameters()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--blocks_to_swap moves blocks between the CPU and a GPU")
def test_flux_training_with_blocks_to_swap_gives_the_same_losses_on_cuda(tmp_path, tiny_flux_single):
    """The issue's check: swapping is exact, so the per-step losses of a run with and without it are equal (also
    with fp8 weights). Measured on an H200: see docs/benchmarks.md."""
    from test_flux_train import flux_toml, read_losses

    ds = build_shapes_dataset(tmp_path)
    losses = {}
    for name, extra in (("plain", []), ("swap", ["--blocks_to_swap", "2"]), ("fp8", ["--fp8_base"]),
                        ("fp8swap", ["--fp8_base", "--blocks_to_swap", "2"])):
        cfg = flux_toml(tmp_path, tiny_flux_single, ds["config"], name=name, max_train_steps=3,
                        output_dir=str(tmp_path / name))
        r = run_script("flux_train_network.py", "--config_file", cfg, "--mixed_precision", "bf16",
                       "--gradient_checkpointing", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = read_losses(tmp_path / f"{name}_loss.jsonl")
    assert len(losses["plain"]) == 3 and losses["swap"] == losses["plain"]
    assert len(losses["fp8"]) == 3 and losses["fp8swap"] == losses["fp8"]  # swapped blocks quantized on the GPU too


# ------------------------------------------------------------------------------------------------- scripts
def test_flux_train_network_with_fp8_base_trains_the_lora(tmp_path, tiny_flux_single):
    from test_flux_train import flux_toml

    ds = build_shapes_dataset(tmp_path)
    cfg = flux_toml(tmp_path, tiny_flux_single, ds["config"], max_train_steps=2)
    r = run_script("flux_train_network.py", "--config_file", cfg, "--fp8_base", "--mixed_precision", "bf16")
    assert r.returncode == 0, r.stderr[-3000:]
    sd = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert any(float(v.float().abs().max()) > 0 for k, v in sd.items()
               if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))


def test_flux_gen_img_with_fp8_base_matches_full_precision(tmp_path, tiny_flux_single):
    base = ["--ckpt", tiny_flux_single, "--prompt", "a red circle", "--W", "64", "--H", "64", "--steps", "2",
            "--seed", "3", "--t5xxl_max_token_length", "16", "--device", "cpu"]
    outs = {}
    for name, extra in (("full", []), ("fp8", ["--fp8_base"])):
        r = run_script("flux_gen_img.py", *base, "--outdir", str(tmp_path / name), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        (png,) = sorted((tmp_path / name).glob("*.png"))
        outs[name] = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    diff = np.abs(outs["full"] - outs["fp8"])
    assert diff.mean() < 8, diff.mean()  # same picture, up to fp8 rounding


def test_swap_prefetch_from_the_config_sets_the_slots(tiny):
    """A `swap_prefetch` on the FLUX config reaches the swapper; a negative one is one clear error."""
    from library.families.flux_placement import apply_low_vram

    tr = copy.deepcopy(tiny.transformer).requires_grad_(False)
    cfg = SimpleNamespace(fp8_base=False, blocks_to_swap=3, swap_prefetch=2)
    swapper = apply_low_vram(tr, cfg, torch.device("cpu"))
    assert swapper.prefetch == 2 and len(swapper._slots) == 3
    swapper.detach()
    default = apply_low_vram(tr, SimpleNamespace(fp8_base=False, blocks_to_swap=3), torch.device("cpu"))
    assert default.prefetch == 1 and len(default._slots) == 2
    default.detach()
    with pytest.raises(UserError, match="--swap_prefetch must be 0 or more"):
        apply_low_vram(tr, SimpleNamespace(fp8_base=False, blocks_to_swap=3, swap_prefetch=-1), torch.device("cpu"))
