"""ControlNet-LLLite on the tiny SDXL U-Net: published names and keys, identity at init, control behaviour, files."""
from __future__ import annotations

import os

import pytest
import torch
from diffusers import UNet2DConditionModel

from library.errors import UserError
from library.models.tiny_configs import TINY_SDXL_UNET
from networks.control_net_lllite import (
    ControlNetLLLite,
    LLLiteError,
    create_network,
    create_network_from_weights,
    infer_dims_from_state_dict,
)

PIXELS = 64  # -> 8x8 latents
COND_EMB_DIM = 8
NETWORK_DIM = 16

# The published layout, written out from the key spec (not from our code): transformer blocks of the input and middle
# blocks of the tiny SDXL U-Net, with their depth, and the four targeted linears of each transformer block.
PUBLISHED_BLOCKS = {
    "input_blocks_4_1": 2,
    "input_blocks_5_1": 2,
    "input_blocks_7_1": 3,
    "input_blocks_8_1": 3,
    "middle_block_1": 3,
}
PUBLISHED_LINEARS = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q")
IN_DIM = 64  # channel width of the tiny U-Net's transformer levels


def published_names() -> list[str]:
    return [
        f"lllite_unet_{block}_transformer_blocks_0_{linear}" for block in PUBLISHED_BLOCKS for linear in PUBLISHED_LINEARS
    ]


def published_shapes(cond: int, net: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape, from the published spec: 4x4/s4 conv to cond/2, then depth 2: 4x4/s4 to cond; depth 3: 4x4/s4
    to cond/2 and 2x2/s2 to cond (ReLUs in between, so the convs sit at indices 0, 2, 4)."""
    convs = {
        2: [(cond // 2, 3, 4, 4), (cond, cond // 2, 4, 4)],
        3: [(cond // 2, 3, 4, 4), (cond // 2, cond // 2, 4, 4), (cond, cond // 2, 2, 2)],
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for block, depth in PUBLISHED_BLOCKS.items():
        for linear in PUBLISHED_LINEARS:
            name = f"lllite_unet_{block}_transformer_blocks_0_{linear}"
            for i, w in enumerate(convs[depth]):
                shapes[f"{name}.conditioning1.{2 * i}.weight"] = w
                shapes[f"{name}.conditioning1.{2 * i}.bias"] = (w[0],)
            shapes[f"{name}.down.0.weight"] = (net, IN_DIM)
            shapes[f"{name}.down.0.bias"] = (net,)
            shapes[f"{name}.mid.0.weight"] = (net, net + cond)
            shapes[f"{name}.mid.0.bias"] = (net,)
            shapes[f"{name}.up.0.weight"] = (IN_DIM, net)
            shapes[f"{name}.up.0.bias"] = (IN_DIM,)
    return shapes


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_SDXL_UNET).eval()
    model.requires_grad_(False)
    return model


def unet_inputs(batch: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(1, 4, PIXELS // 8, PIXELS // 8, generator=g).repeat(batch, 1, 1, 1),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(1, 8, 64, generator=g).repeat(batch, 1, 1),
        added_cond_kwargs=dict(text_embeds=torch.zeros(batch, 32), time_ids=torch.zeros(batch, 6)),
    )


def run(unet, **kw) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs(**kw)).sample


def square_image(x: int, y: int, size: int = 16, batch: int = 1) -> torch.Tensor:
    img = torch.zeros(batch, 3, PIXELS, PIXELS)
    img[:, :, y : y + size, x : x + size] = 1.0
    return img


def randomize(network: ControlNetLLLite, seed: int = 0, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def attached(unet):
    """A network attached to the shared U-Net, detached again after the test."""
    networks: list[ControlNetLLLite] = []

    def make(**kw) -> ControlNetLLLite:
        net = create_network(unet, kw.pop("cond_emb_dim", COND_EMB_DIM), kw.pop("network_dim", NETWORK_DIM), **kw)
        net.apply_to()
        networks.append(net)
        return net

    yield make
    for net in networks:
        net.remove_from()


def test_module_names_are_published(unet):
    net = create_network(unet, COND_EMB_DIM, NETWORK_DIM)
    names = [m.lllite_name for m in net.unet_modules]
    assert names == published_names()
    assert "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert not any("output_blocks" in n for n in names)
    assert not any("attn2_to_k" in n or "attn2_to_v" in n or "to_out" in n for n in names)


def test_output_blocks_optional(unet):
    net = create_network(unet, COND_EMB_DIM, NETWORK_DIM, include_output_blocks=True)
    out = [m for m in net.unet_modules if "output_blocks" in m.lllite_name]
    assert len(out) == 6 * 4  # output blocks 0-5 have one transformer block each in the tiny U-Net
    depth = {m.lllite_name.split("_transformer")[0]: m.depth for m in out}
    assert depth["lllite_unet_output_blocks_0_1"] == 3 and depth["lllite_unet_output_blocks_5_1"] == 2


def test_key_set_and_shapes_match_spec(unet):
    net = create_network(unet, COND_EMB_DIM, NETWORK_DIM)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == published_shapes(COND_EMB_DIM, NETWORK_DIM)
    assert infer_dims_from_state_dict(net.state_dict()) == (COND_EMB_DIM, NETWORK_DIM)


def test_unet_untouched_and_frozen(unet, attached):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    modules_before = [n for n, _ in unet.named_modules()]
    net = attached()
    assert [n for n, _ in unet.named_modules()] == modules_before
    after = unet.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    unet_ids = {id(p) for p in unet.parameters()}
    params = net.prepare_optimizer_params(1e-3)[0]["params"]
    assert params and not any(id(p) in unet_ids for p in params)
    assert not any(p.requires_grad for p in unet.parameters())


def test_identity_at_init(unet, attached):
    base = run(unet)
    net = attached()
    net.set_cond_image(square_image(8, 8))
    assert torch.equal(run(unet), base)


def test_output_depends_on_cond_and_scales_with_multiplier(unet, attached):
    base = run(unet)
    net = attached()
    randomize(net)
    net.set_cond_image(square_image(0, 0))
    a = run(unet)
    net.set_cond_image(square_image(40, 40))
    b = run(unet)
    assert not torch.allclose(a, base, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-4)

    # the residual of each module is linear in the multiplier
    module = net.unet_modules[0]
    x = torch.randn(1, (PIXELS // 16) ** 2, IN_DIM)
    with torch.no_grad():
        net.set_multiplier(1.0)
        r1 = module.control(x)
        net.set_multiplier(2.0)
        r2 = module.control(x)
    assert torch.allclose(r2, 2 * r1, atol=1e-6) and r1.abs().max() > 0

    net.set_multiplier(0.5)
    half = (run(unet) - base).abs().mean()
    net.set_multiplier(1.0)
    full = (run(unet) - base).abs().mean()
    assert 0 < half < full
    net.set_multiplier(0.0)
    assert torch.equal(run(unet), base)
    net.set_multiplier(1.0)
    net.set_cond_image(None)
    assert torch.equal(run(unet), base)
    net.set_cond_image(square_image(0, 0))
    net.remove_from()
    assert torch.equal(run(unet), base)


def test_embedding_computed_once_per_cond_image(unet, attached):
    net = attached()
    calls = []
    handles = [m.conditioning1.register_forward_hook(lambda *a: calls.append(1)) for m in net.unet_modules]
    try:
        net.set_cond_image(square_image(8, 8))
        for _ in range(3):
            run(unet)
        assert len(calls) == len(net.unet_modules)
        net.set_cond_image(square_image(16, 16))
        run(unet)
        assert len(calls) == 2 * len(net.unet_modules)
    finally:
        for h in handles:
            h.remove()


def test_cfg_batch_repeats_cond(unet, attached):
    net = attached()
    randomize(net)
    net.set_cond_image(square_image(8, 8))
    single = run(unet, batch=1)
    double = run(unet, batch=2)  # [uncond, cond] style batch with one control image
    assert torch.allclose(double[0], single[0], atol=1e-5) and torch.allclose(double[1], single[0], atol=1e-5)


def test_bad_cond_inputs_are_clear(unet, attached):
    net = attached()
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        net.set_cond_image(square_image(0, 0) * 2 - 1)
    with pytest.raises(UserError, match="multiple of 32"):
        net.set_cond_image(torch.zeros(1, 3, 48, 48))
    with pytest.raises(UserError, match=r"\[B, 3, H, W\]"):
        net.set_cond_image(torch.zeros(1, 1, 64, 64))
    net.set_cond_image(torch.zeros(1, 3, 128, 128))  # 16x16 latents' worth of tokens for 8x8 latents
    with pytest.raises(LLLiteError, match="tokens"):
        run(unet)


def test_save_load_bit_identical(unet, tmp_path):
    net = create_network(unet, COND_EMB_DIM, NETWORK_DIM)
    randomize(net, seed=3)
    path = tmp_path / "lllite.safetensors"
    net.save_weights(path, metadata={"ss_network_dim": 16})
    assert os.listdir(tmp_path) == ["lllite.safetensors"]  # no temp files left
    other = create_network(unet, COND_EMB_DIM, NETWORK_DIM)
    other.load_weights(path)
    a, b = net.state_dict(), other.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"ss_network_dim": "16"}

    loaded = create_network_from_weights(unet, path, multiplier=0.7)
    assert (loaded.cond_emb_dim, loaded.network_dim) == (COND_EMB_DIM, NETWORK_DIM)
    assert all(m.multiplier == 0.7 for m in loaded.unet_modules)
    c = loaded.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)

    net.save_weights(tmp_path / "half.safetensors", dtype=torch.float16)
    half = create_network_from_weights(unet, tmp_path / "half.safetensors")
    assert half.unet_modules[0].down[0].weight.dtype == torch.float32
    k = "lllite_unet_middle_block_1_transformer_blocks_0_attn2_to_q.mid.0.weight"
    assert torch.equal(half.state_dict()[k], a[k].half().float())


def test_hand_written_published_file_loads(unet, tmp_path):
    from safetensors.torch import save_file

    cond, net_dim = 16, 32  # dims other than the defaults, to exercise inference from the file
    g = torch.Generator().manual_seed(5)
    sd = {k: torch.randn(shape, generator=g).half() for k, shape in published_shapes(cond, net_dim).items()}
    path = tmp_path / "published.safetensors"
    save_file(sd, str(path))
    net = create_network_from_weights(unet, path)
    assert (net.cond_emb_dim, net.network_dim) == (cond, net_dim)
    got = net.state_dict()
    assert all(torch.equal(got[k], sd[k].float()) for k in sd)
    # and it runs: a published file controls the U-Net
    net.apply_to()
    try:
        net.set_cond_image(square_image(8, 8))
        with_control = run(unet)
        net.set_cond_image(None)
        assert not torch.allclose(with_control, run(unet), atol=1e-4)
    finally:
        net.remove_from()


def test_load_errors_are_clear(unet, tmp_path):
    from safetensors.torch import save_file

    shapes = published_shapes(COND_EMB_DIM, NETWORK_DIM)
    net = create_network(unet, COND_EMB_DIM, NETWORK_DIM)

    partial = {k: torch.zeros(s) for k, s in shapes.items() if "middle_block" not in k}
    partial["lllite_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2.down.0.weight"] = torch.zeros(1)
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError) as err:
        net.load_weights(tmp_path / "partial.safetensors")
    msg = str(err.value)
    assert "partial.safetensors" in msg and "48 missing keys" in msg and "1 unexpected keys" in msg
    assert "middle_block_1" in msg and "ff_net_2" in msg

    other = {k: torch.zeros(s) for k, s in published_shapes(16, 32).items()}
    save_file(other, str(tmp_path / "dims.safetensors"))
    with pytest.raises(UserError, match=r"cond_emb_dim=16, network_dim=32.*cond_emb_dim=8, network_dim=16") as err:
        net.load_weights(tmp_path / "dims.safetensors")
    assert "conditioning1.0.weight" in str(err.value)

    with pytest.raises(UserError, match="not found"):
        net.load_weights(tmp_path / "missing.safetensors")


def test_training_learns_square_position(unet, attached):
    """Adam on the LLLite parameters only (U-Net frozen) must make the output depend on where the square is.

    The two samples share every U-Net input except the control image, and their targets are opposite (base +/- a
    pattern of the two square positions): anything that ignores the control image cannot beat the initial loss, so
    a loss drop can only come from reading the square's position."""
    torch.manual_seed(0)
    net = attached()
    net.train()
    cond = torch.cat([square_image(0, 0, size=32), square_image(32, 32, size=32)])
    masks = torch.nn.functional.avg_pool2d(cond[:, :1], 8).expand(-1, 4, -1, -1)  # the squares at latent size
    pattern = masks[0] - masks[1]
    inputs = unet_inputs(batch=2)
    with torch.no_grad():
        base = unet(**inputs).sample
    target = base + 0.2 * torch.stack([pattern, -pattern])
    opt = torch.optim.Adam(net.prepare_optimizer_params(1e-2))
    cond_w0 = net.unet_modules[0].conditioning1[0].weight.detach().clone()
    losses = []
    for _ in range(30):
        net.set_cond_image(cond)  # once per step, with grad: conditioning1 trains too
        loss = torch.nn.functional.mse_loss(unet(**inputs).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(p.grad is None for p in unet.parameters())
    assert not torch.equal(net.unet_modules[0].conditioning1[0].weight, cond_w0)  # the embedding trains too
    with torch.no_grad():
        net.set_cond_image(cond)
        out = unet(**inputs).sample
    # the difference between the two outputs follows the difference between the squares
    similarity = torch.nn.functional.cosine_similarity((out[0] - out[1]).flatten(), pattern.flatten(), dim=0)
    assert similarity > 0.3, similarity


def test_checkpointed_unet_and_mixed_dtypes():
    """Gradients reach every LLLite parameter through the U-Net's gradient checkpointing; an fp32 network runs in
    a bf16 U-Net (generation with a low-precision U-Net)."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_SDXL_UNET)
    model.requires_grad_(False)
    model.enable_gradient_checkpointing()
    model.train()
    net = create_network(model, COND_EMB_DIM, NETWORK_DIM)
    net.apply_to()
    randomize(net)
    net.set_cond_image(square_image(0, 0))
    model(**unet_inputs()).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())

    model.to(torch.bfloat16).eval()
    inputs = unet_inputs()
    inputs["sample"] = inputs["sample"].bfloat16()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].bfloat16()
    inputs["added_cond_kwargs"] = {k: v.bfloat16() for k, v in inputs["added_cond_kwargs"].items()}
    with torch.no_grad():
        net.set_cond_image(square_image(0, 0))
        out = model(**inputs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bad_dims_rejected(unet):
    with pytest.raises(UserError, match="cond_emb_dim"):
        ControlNetLLLite(unet, cond_emb_dim=7)
    with pytest.raises(UserError, match="network_dim"):
        ControlNetLLLite(unet, network_dim=0)
