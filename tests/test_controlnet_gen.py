"""Pretrained ControlNets in sdxl_gen_img.py and flux_gen_img.py, on tiny random ControlNets built from the tiny
base models (diffusers' from_unet / from_transformer, zero convolutions randomised so that they act)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.prompts.language import parse_prompt_line
from library.prompts.png_metadata import read_png_info
from library.sample.controlnets import ControlNetSpec, mode_index, specs_from_flags
from library.sample.flux_generate import FluxGenerationConfig, FluxOptions, run_flux_generation
from library.sample.generation import GenerationConfig, LLLiteSpec, plan_requests
from library.sample.sdxl_generate import SDXLGenerator, check_config, run_generation

SIZE = 64


def _randomise_zero_layers(model: torch.nn.Module, seed: int, names: tuple[str, ...], scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(n) for n in names):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if name.startswith("controlnet_cond_embedding.") and name.endswith("weight"):
                p.mul_(4.0)  # a strong response to the guide image, so that guides can be told apart


@pytest.fixture(scope="module")
def sdxl_controlnets(tmp_path_factory) -> dict[str, str]:
    from diffusers import ControlNetModel, ControlNetUnionModel
    from safetensors.torch import save_file

    from library.models.tiny import build_tiny_sdxl

    unet = build_tiny_sdxl(0).unet
    root = tmp_path_factory.mktemp("cn")
    torch.manual_seed(0)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    _randomise_zero_layers(cn, 1, ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"))
    cn.save_pretrained(root / "cn")
    single = root / "single" / "cn.safetensors"
    single.parent.mkdir()
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(single))
    out = {"folder": str(root / "cn"), "file": str(single)}
    try:
        shape = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16),
                                               load_weights_from_unet=False).config
        # the task transformer's width must be the first block's (320 in SDXL; 32 in the tiny U-Net)
        config = {k: v for k, v in shape.items() if k != "_use_default_values"}  # else diffusers drops overrides
        union = ControlNetUnionModel.from_config({**config, "num_trans_channel": 32, "num_trans_head": 2,
                                                  "num_proj_channel": 32})
    except Exception as exc:  # noqa: BLE001 - reported by the union test
        out["union_error"] = repr(exc)
        return out
    _randomise_zero_layers(union, 2, ("controlnet_down_blocks", "controlnet_mid_block",
                                      "controlnet_cond_embedding.conv_out"))
    union.save_pretrained(root / "union")
    out["union"] = str(root / "union")
    return out


@pytest.fixture(scope="module")
def guides(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("guides")
    yy, xx = np.mgrid[0:96, 0:96]
    stripes = ((xx // 8) % 2 * 255).astype(np.uint8)
    a, b = root / "a_stripes.png", root / "b_dark.png"
    Image.fromarray(np.stack([stripes] * 3, -1)).save(a)
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(b)
    return [str(a), str(b)]


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths]


def max_diff(a, b) -> int:
    return int(np.abs(a - b).max())


def sdxl(model: str, out: Path, prompt: str = "a house", loaded=None, **kw) -> np.ndarray:
    """One image; with `loaded` (models that ControlNets leave untouched) the model is not loaded again."""
    values = dict(model=model, outdir=str(out), prompts=[parse_prompt_line(prompt)], width=SIZE, height=SIZE,
                  steps=2, scale=5.0, seed=7, sampler="euler_a", device="cpu")
    values.update(kw)
    config = GenerationConfig(**values)
    if loaded is None:
        return pixels(run_generation(config))[0]
    check_config(config)
    generator = SDXLGenerator(loaded, config, torch.device("cpu"))
    return pixels(generator.generate(plan_requests(config, None, config.seed)))[0]


@pytest.fixture(scope="module")
def sdxl_models(tiny_sdxl_file):
    from library.models.sdxl_loader import load_sdxl

    return load_sdxl(tiny_sdxl_file, torch.float32, None, False)


# ----------------------------------------------------------------------------------------------------- flags


def test_flags_give_one_guide_per_input():
    specs = specs_from_flags(["a", "b"], ["g1", "g2", "g3"], [0.5], [1.0, 0.4], ["", "canny,depth"])
    assert specs[0] == ControlNetSpec("a", ("g1",), 0.5, 1.0, ())
    assert specs[1] == ControlNetSpec("b", ("g2", "g3"), 0.5, 0.4, ("canny", "depth"))
    assert specs_from_flags(["a", "b"], ["g"], None, None, None)[1].guides == ("g",)
    with pytest.raises(UserError, match="--control_net_ratios"):
        specs_from_flags(["a", "b"], ["g"], None, [1, 1, 1], None)
    with pytest.raises(UserError, match="--guide_image_path"):
        specs_from_flags(["a"], ["g1", "g2"], None, None, None)
    assert mode_index("canny", "sdxl", "x") == 3 and mode_index("depth", "flux", "x") == 2
    with pytest.raises(UserError, match="unknown control type"):
        mode_index("sketchy", "sdxl", "x")


# ----------------------------------------------------------------------------------------------------- SDXL


def test_sdxl_controlnet_changes_image_follows_guide_and_ratio(tmp_path, tiny_sdxl_file, sdxl_models,
                                                              sdxl_controlnets, guides):
    folder = sdxl_controlnets["folder"]

    def gen(name, prompt="a house", **kw):
        return sdxl(tiny_sdxl_file, tmp_path / name, prompt, loaded=sdxl_models, **kw)

    base = gen("base")
    with_a = gen("a", controlnets=[ControlNetSpec(folder, (guides[0],))])
    with_b = gen("b", controlnets=[ControlNetSpec(folder, (guides[1],))])
    ratio0 = gen("r0", controlnets=[ControlNetSpec(folder, (guides[0],), ratio=0.0)])
    from_file = gen("file", controlnets=[ControlNetSpec(sdxl_controlnets["file"], (guides[0],))])
    via_cn = gen("cn", prompt="a house --cn " + guides[1], controlnets=[ControlNetSpec(folder, (guides[0],))])
    assert max_diff(base, with_a) > 10
    assert max_diff(with_a, with_b) > 10
    assert max_diff(base, ratio0) == 0
    assert max_diff(with_a, from_file) == 0  # single file without config: layout derived from the base U-Net
    assert max_diff(via_cn, with_b) == 0  # a prompt's --cn replaces the guide image


def test_sdxl_controlnet_with_zero_convolutions_leaves_image_unchanged(tmp_path, tiny_sdxl_file, sdxl_models, guides):
    """A ControlNet made from the U-Net keeps diffusers' zero-initialised output convolutions: it adds nothing, so
    the image is exactly the one without it (the perturbed one above changes it)."""
    from diffusers import ControlNetModel

    cn = ControlNetModel.from_unet(sdxl_models.unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    cn.save_pretrained(tmp_path / "zero_cn")
    base = sdxl(tiny_sdxl_file, tmp_path / "base", loaded=sdxl_models)
    zero = sdxl(tiny_sdxl_file, tmp_path / "zero", loaded=sdxl_models,
                controlnets=[ControlNetSpec(str(tmp_path / "zero_cn"), (guides[0],))])
    assert max_diff(base, zero) == 0


def test_sdxl_controlnet_combines_with_lllite(tmp_path, tiny_sdxl_file, sdxl_models, sdxl_controlnets, guides):
    from library.models.tiny import build_tiny_sdxl
    from networks.control_net_lllite import create_network

    net = create_network(build_tiny_sdxl(0).unet, cond_emb_dim=8, network_dim=8)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in net.unet_modules:
            module.up[0].weight.copy_(torch.randn(module.up[0].weight.shape, generator=gen))
    lllite = tmp_path / "lllite.safetensors"
    net.save_weights(str(lllite))
    spec = [ControlNetSpec(sdxl_controlnets["folder"], (guides[0],))]
    cn_only = sdxl(tiny_sdxl_file, tmp_path / "cn", loaded=sdxl_models, controlnets=spec)
    both = sdxl(tiny_sdxl_file, tmp_path / "both", controlnets=spec, lllite=[LLLiteSpec(str(lllite), 1.0)],
                guide_image_path=guides[0])
    assert max_diff(cn_only, both) > 0


def test_sdxl_union_modes(tmp_path, tiny_sdxl_file, sdxl_models, sdxl_controlnets, guides):
    if "union" not in sdxl_controlnets:
        pytest.fail("ControlNetUnionModel could not be built tiny: " + sdxl_controlnets["union_error"])
    union = sdxl_controlnets["union"]

    def gen(name, **kw):
        return sdxl(tiny_sdxl_file, tmp_path / name, loaded=sdxl_models, **kw)

    base = gen("base")
    canny = gen("canny", controlnets=[ControlNetSpec(union, (guides[0],), types=("canny",))])
    depth = gen("depth", controlnets=[ControlNetSpec(union, (guides[0],), types=("depth",))])
    two = gen("two", controlnets=[ControlNetSpec(union, (guides[0], guides[1]), types=("canny", "depth"))])
    assert max_diff(base, canny) > 0 and max_diff(canny, depth) > 0 and max_diff(canny, two) > 0
    with pytest.raises(UserError, match="union model"):
        gen("none", controlnets=[ControlNetSpec(union, (guides[0],))])


# ----------------------------------------------------------------------------------------------------- FLUX


@pytest.fixture(scope="module")
def flux_setup(tmp_path_factory) -> dict[str, str]:
    from diffusers import FluxControlNetModel

    from library.models.tiny_flux import TINY_FLUX_TRANSFORMER, save_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    model = save_tiny_flux(str(root / "single"), "single_file", seed=0)
    out = {"model": model}
    for name, mode in (("plain", None), ("union", 7)):
        torch.manual_seed(1)
        cn = FluxControlNetModel(**{**TINY_FLUX_TRANSFORMER, "num_layers": 1, "num_single_layers": 1,
                                    "num_mode": mode})
        _randomise_zero_layers(cn, 5, ("controlnet_x_embedder", "controlnet_blocks", "controlnet_single_blocks"))
        cn.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def flux(setup, out: Path, prompt: str = "a circle", **kw) -> np.ndarray:
    config = GenerationConfig(model=setup["model"], outdir=str(out), prompts=[parse_prompt_line(prompt)], width=SIZE,
                              height=SIZE, steps=2, scale=3.5, seed=7, sampler="", device="cpu", **kw)
    paths = run_flux_generation(FluxGenerationConfig(config, FluxOptions(t5xxl_max_token_length=16)))
    return pixels(paths)[0], read_png_info(paths[0])


def test_flux_controlnet_plain_and_union(tmp_path, flux_setup, guides):
    base, _ = flux(flux_setup, tmp_path / "base")
    a, info = flux(flux_setup, tmp_path / "a", controlnets=[ControlNetSpec(flux_setup["plain"], (guides[0],))])
    b, _ = flux(flux_setup, tmp_path / "b", controlnets=[ControlNetSpec(flux_setup["plain"], (guides[1],))])
    assert max_diff(base, a) > 0 and max_diff(a, b) > 0
    assert info.extra["controlnet_guides"] == guides[0]
    ratio0, _ = flux(flux_setup, tmp_path / "r0", controlnets=[ControlNetSpec(flux_setup["plain"], (guides[0],), ratio=0)])
    assert max_diff(base, ratio0) == 0
    canny, _ = flux(flux_setup, tmp_path / "canny",
                    controlnets=[ControlNetSpec(flux_setup["union"], (guides[0],), types=("canny",))])
    depth, _ = flux(flux_setup, tmp_path / "depth",
                    controlnets=[ControlNetSpec(flux_setup["union"], (guides[0],), types=("depth",))])
    mixed, _ = flux(flux_setup, tmp_path / "mixed",
                    controlnets=[ControlNetSpec(flux_setup["plain"], (guides[0],)),
                                 ControlNetSpec(flux_setup["union"], (guides[0], guides[1]), types=("canny", "depth"))])
    assert max_diff(base, canny) > 0 and max_diff(canny, depth) > 0 and max_diff(mixed, canny) > 0
