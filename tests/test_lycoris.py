"""LyCORIS (`--network_module lycoris.kohya`, the `lycoris-lora` package) on our trainers and generators.

LyCORIS names its modules after the model it is handed and picks layers by container class names, so it must see
the models as sd-scripts shows them (networks/model_views.py). These tests check that every algorithm trains through
the scripts on the tiny SDXL and FLUX, that the files carry the published module names (the same ones our own LoRA
writes: `lora_unet_input_blocks_...` for SDXL, BFL's `lora_unet_double_blocks_N_img_attn_qkv` for FLUX), that
generation applies and merges them, and that LyCORIS' own loader reads them back onto our models unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import build_shapes_dataset, run_script, write_toml

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="the [lycoris] extra (lycoris-lora) is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")

# (test id, --network_args): every algorithm sd-scripts users train with LyCORIS, and DoRA on top of LoRA.
ALGORITHMS = [
    ("lora", ["algo=lora"]),
    ("locon", ["algo=locon"]),
    ("loha", ["algo=loha"]),
    ("lokr", ["algo=lokr"]),
    ("dylora", ["algo=dylora"]),
    ("full", ["algo=full"]),
    ("ia3", ["algo=ia3"]),
    ("dora", ["algo=lora", "dora_wd=True"]),
]


def _toml(tmp_path: Path, family: str, model: str, network_args: list[str], **extra) -> str:
    ds = build_shapes_dataset(tmp_path)
    values = dict(pretrained_model_name_or_path=model, dataset_config=ds["config"], output_dir=str(tmp_path / "out"),
                  output_name="lyco", network_module="lycoris.kohya", network_dim=4, network_alpha=4.0,
                  network_args=network_args, learning_rate=1e-3, max_train_steps=2, seed=1, optimizer_type="AdamW")
    if family == "flux":
        values.update(t5xxl_max_token_length=16, timestep_sampling="shift", model_prediction_type="raw",
                      guidance_scale=1.0)
    values.update(extra)
    header = "[model]\n" if family == "sdxl" else ""
    return write_toml(tmp_path / "run.toml", header + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
                      + "\n")


def _module_names(sd: dict) -> set[str]:
    return {k.split(".", 1)[0] for k in sd}


# ------------------------------------------------------------------------------------------- what the view shows


@pytest.fixture(scope="module")
def sdxl_models():
    from library.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(0)


@pytest.fixture(scope="module")
def flux_models():
    from library.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(0)


@pytest.fixture(scope="module")
def published_sdxl_names(sdxl_models) -> set[str]:
    """Module names our own LoRA (checked against published files elsewhere) writes for the tiny SDXL, LoCon on."""
    from networks.lora import LoRANetwork

    m = sdxl_models
    return {lora.lora_name for lora in LoRANetwork([m.text_encoder1, m.text_encoder2], m.unet, conv_lora_dim=4).loras}


@pytest.fixture(scope="module")
def published_flux_names(flux_models) -> set[str]:
    from networks.lora_flux import FluxLoRANetwork

    return {lora.lora_name for lora in FluxLoRANetwork([flux_models.clip_l, flux_models.t5],
                                                       flux_models.transformer).loras}


def _lycoris_on_view(text_encoders, denoiser, algo: str = "lokr", **kwargs):
    from networks.model_views import sd_scripts_text_encoders, sd_scripts_view

    tes, view = sd_scripts_text_encoders(text_encoders), sd_scripts_view(denoiser)
    network = lycoris_kohya.create_network(1.0, 4, 4.0, None, tes, view, algo=algo, **kwargs)
    network.apply_to(tes, view, True, True)
    return network, tes, view


def test_sdxl_view_names_and_shares_the_layers(sdxl_models, published_sdxl_names):
    from networks.model_views import sgm_unet_view

    unet = sdxl_models.unet
    view = sgm_unet_view(unet)
    assert view.get_submodule("input_blocks.4.1.transformer_blocks.0.attn1.to_q") is \
        unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q  # the same layer, not a copy
    assert view.get_submodule("input_blocks.1.0.in_layers.2") is unet.down_blocks[0].resnets[0].conv1
    kinds = {type(view.get_submodule(p)).__name__ for p in ("input_blocks.4.1", "input_blocks.1.0",
                                                             "input_blocks.3.0", "output_blocks.2.2")}
    assert kinds == {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
    network, _, _ = _lycoris_on_view([sdxl_models.text_encoder1, sdxl_models.text_encoder2], unet)
    try:
        assert {lora.lora_name for lora in network.loras} == published_sdxl_names
    finally:
        for lora in network.loras:
            lora.restore()


def test_flux_view_names_fused_qkv_and_is_exact_until_hooked(flux_models, published_flux_names):
    from networks.model_views import FusedLinear, sd_scripts_view

    tr = flux_models.transformer
    block = tr.transformer_blocks[0]
    torch.manual_seed(0)
    hidden = torch.randn(1, 16, block.attn.to_q.in_features)
    before = block.attn.to_q(hidden), block.attn.to_v(hidden)
    view = sd_scripts_view(tr)
    qkv = view.get_submodule("double_blocks.0.img_attn.qkv")
    assert isinstance(qkv, FusedLinear) and type(qkv).__name__ == "Linear"
    assert qkv.weight.shape == (3 * block.attn.to_q.out_features, block.attn.to_q.in_features)
    assert torch.equal(qkv.weight[:block.attn.to_q.out_features], block.attn.to_q.weight)
    assert view.get_submodule("single_blocks.0.linear2") is tr.single_transformer_blocks[0].proj_out
    after = block.attn.to_q(hidden), block.attn.to_v(hidden)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # members run as themselves until hooked
    network, _, _ = _lycoris_on_view([flux_models.clip_l, flux_models.t5], tr)
    try:
        assert {lora.lora_name for lora in network.loras} == published_flux_names
        unet_names = {lora.lora_name for lora in network.unet_loras}
        assert "lora_unet_double_blocks_0_img_attn_qkv" in unet_names
        assert "lora_unet_single_blocks_0_linear1" in unet_names
    finally:
        for lora in network.loras:
            lora.restore()


def test_hooked_fused_layer_is_the_fused_update(flux_models):
    """A LoRA on BFL's fused qkv adds `up @ down` over the concatenated q/k/v outputs: check the members' outputs
    against that update computed by hand."""
    from networks.model_views import sd_scripts_view

    tr = flux_models.transformer
    attn = tr.transformer_blocks[1].attn
    torch.manual_seed(1)
    x = torch.randn(2, 5, attn.to_q.in_features)
    base = [attn.to_q(x), attn.to_k(x), attn.to_v(x)]
    view = sd_scripts_view(tr)
    network = lycoris_kohya.create_network(1.0, 4, 4.0, None, None, view, algo="lora")
    network.apply_to(None, view, False, True)
    try:
        lora = next(m for m in network.unet_loras if m.lora_name == "lora_unet_double_blocks_1_img_attn_qkv")
        with torch.no_grad():
            lora.lora_up.weight.normal_()
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # same x object: one fused call, three slices
        delta = torch.nn.functional.linear(x, lora.lora_up.weight @ lora.lora_down.weight) * lora.scale
        want = torch.cat(base, -1) + delta
        got = torch.cat([q, k, v], -1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        for m in network.loras:
            m.restore()
    assert torch.equal(attn.to_q(x), base[0])


# ------------------------------------------------------------------------------------------- training, per algorithm


@pytest.mark.parametrize("family", ["sdxl", "flux"])
@pytest.mark.parametrize("algo, network_args", ALGORITHMS, ids=[a for a, _ in ALGORITHMS])
def test_two_step_training_writes_published_names_and_round_trips(
        tmp_path, family, algo, network_args, tiny_sdxl_file, tiny_flux_single, published_sdxl_names,
        published_flux_names, sdxl_models, flux_models):
    """Trains through the script; the file has the published names, and LyCORIS' own `create_network_from_weights`
    reads it back onto our models with every module finding its layer and the same tensors saved again."""
    model = tiny_sdxl_file if family == "sdxl" else tiny_flux_single
    script = "sdxl_train_network.py" if family == "sdxl" else "flux_train_network.py"
    r = run_script(script, "--config_file", _toml(tmp_path, family, model, network_args))
    assert r.returncode == 0, r.stderr[-3000:]
    sd = load_file(str(tmp_path / "out" / "lyco.safetensors"))
    names = _module_names(sd)
    published = published_sdxl_names if family == "sdxl" else published_flux_names
    assert names and names <= published, sorted(names - published)[:5]
    probe = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" if family == "sdxl"
             else "lora_unet_double_blocks_0_img_attn_qkv")
    assert probe in names
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_") for n in names)
    if algo == "dora":
        assert f"{probe}.dora_scale" in sd
    if family == "flux" and algo in ("lora", "locon"):
        assert sd[f"{probe}.lora_up.weight"].shape[0] == 3 * sd[f"{probe}.lora_down.weight"].shape[1]  # fused qkv
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    _assert_round_trip(tmp_path / "out" / "lyco.safetensors", sd, sdxl_models if family == "sdxl" else flux_models)


def _alpha_unused(sd: dict, name: str) -> bool:
    """LoKr with both Kronecker factors stored whole uses scale 1 whatever the alpha: LyCORIS rewrites that alpha
    when it loads the file, so it need not come back as written."""
    return f"{name}.lokr_w1" in sd and f"{name}.lokr_w2" in sd


def _assert_round_trip(file: Path, saved: dict, models) -> None:
    from networks.model_views import sd_scripts_text_encoders, sd_scripts_view

    if hasattr(models, "unet"):
        tes, denoiser = [models.text_encoder1, models.text_encoder2], models.unet
    else:
        tes, denoiser = [models.clip_l, models.t5], models.transformer
    tes, view = sd_scripts_text_encoders(tes), sd_scripts_view(denoiser)
    try:
        network, _ = lycoris_kohya.create_network_from_weights(1.0, str(file), None, tes, view)
    except TypeError as e:
        if "IA3Module.make_module_from_state_dict" not in str(e):
            raise
        # lycoris-lora 4.1.x: IA3Module.extract_state_dict returns (weight, on_input) but make_module_from_state_dict
        # takes (weight) only, so LyCORIS cannot read its own (IA)^3 files on any model (sd-scripts' included)
        pytest.skip(f"LyCORIS cannot load its own IA3 files: {e}")
    except RuntimeError as e:
        conv_ups = [k for k, v in saved.items() if k.endswith(".lora_up.weight") and v.dim() == 2
                    and saved[k.replace("lora_up", "lora_down")].dim() == 4]
        if not conv_ups or "broadcast shape" not in str(e):
            raise
        # lycoris-lora 4.1.x: DyLoRA writes a conv layer's lora_up as a 2-D matrix, and LyCORIS' loader (LoConModule)
        # copies it into a 4-D weight; its own DyLoRA files with conv layers (SDXL's ResNets) cannot be read back
        pytest.skip(f"LyCORIS cannot load its own DyLoRA conv modules ({conv_ups[0]}: 2-D lora_up): {e}")
    network.apply_to(tes, view, True, True)
    try:
        assert {lora.lora_name for lora in network.loras} == _module_names(saved)
        network.save_weights(str(file.with_name("again.safetensors")), None, {})
        again = load_file(str(file.with_name("again.safetensors")))
        assert again.keys() == saved.keys()
        for key, value in saved.items():  # algo=full stores weight - base: exact up to one float32 rounding
            if key.endswith(".alpha") and _alpha_unused(saved, key[:-len(".alpha")]):
                continue
            assert torch.allclose(again[key].float(), value.float(), rtol=0, atol=1e-6), (key, again[key], value)
    finally:
        for lora in network.loras:
            lora.restore()


# ------------------------------------------------------------------------------------------- generation, round trip


def _random_lokr_file(path: Path, text_encoders, denoiser) -> str:
    """A LoKr file written by LyCORIS itself (on the sd-scripts view), with weights big enough to change an image."""
    network, _, _ = _lycoris_on_view(text_encoders, denoiser, "lokr")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    network.save_weights(str(path), torch.float32, {})
    for lora in network.loras:
        lora.restore()
    return str(path)


def _pixels(folder: Path) -> np.ndarray:
    (png,) = sorted(folder.glob("*.png"))
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_generation_applies_and_merges_a_lycoris_file(tmp_path, family, tiny_sdxl_file, tiny_flux_single,
                                                      sdxl_models, flux_models):
    if family == "sdxl":
        file = _random_lokr_file(tmp_path / "lokr.safetensors",
                                 [sdxl_models.text_encoder1, sdxl_models.text_encoder2], sdxl_models.unet)
        script, model = "sdxl_gen_img.py", tiny_sdxl_file
    else:
        file = _random_lokr_file(tmp_path / "lokr.safetensors", [flux_models.clip_l, flux_models.t5],
                                 flux_models.transformer)
        script, model = "flux_gen_img.py", tiny_flux_single

    def gen(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / name
        r = run_script(script, "--pretrained_model_name_or_path", model, "--outdir", str(out), "--prompt",
                       "a red cube", "--W", "64", "--H", "64", "--steps", "2", "--seed", "1", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        return _pixels(out)

    lyco = ("--network_module", "lycoris.kohya", "--network_weights", file)
    base = gen("base")
    applied = gen("applied", *lyco)
    merged = gen("merged", *lyco, "--network_merge")
    assert np.abs(base - applied).max() > 5
    assert np.abs(applied - merged).max() <= 2
