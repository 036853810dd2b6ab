"""sdxl_gen_img.py: --negative_scale, Deep Shrink (--ds_*) and gradual latent (--gradual_latent_*), and their
prompt options (--nl; --dsd1 --dst1 --dsd2 --dst2 --dsr; --glt --glr --gle --gls --glsn --glus), on the tiny SDXL.

With 4 steps, SDXL's "leading" spacing gives the timesteps 751, 501, 251, 1: Deep Shrink with --ds_timesteps_1 500
acts on the first two steps only.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from library.cli import run_main
from library.errors import UserError
from library.prompts.language import PromptSyntaxError, parse_prompt_line
from library.prompts.png_metadata import read_png_info
from library.sample.deep_shrink import DeepShrink, deep_shrink_hooks, resolve as resolve_shrink
from library.sample.generation import GenerationConfig
from library.sample.gradual_latent import GradualLatent, gaussian_blur, parse_unsharp, resolve as resolve_gradual
from library.sample.negative_scale import negative_scale_hooks
from library.sample.sdxl_generate import run_generation

STEPS = 4
LINE = "a red cube on a table --d 11 --n blurry, dark"  # one seed for every image, whatever its index


def gen(model: str, outdir: Path, prompts=(LINE,), size: int = 64, **kw) -> list[np.ndarray]:
    values = dict(model=model, outdir=str(outdir), prompts=[parse_prompt_line(p) for p in prompts], width=size,
                  height=size, steps=STEPS, scale=5.0, seed=7, sampler="euler_a", device="cpu")
    values.update(kw)
    paths = run_generation(GenerationConfig(**values))
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


# ----------------------------------------------------------------------------------------------------- prompt options


def test_prompt_options_parse_with_sd_scripts_letters():
    spec = parse_prompt_line("x --dsd1 2 --dst1 700 --dsd2 5 --dst2 300 --dsr 0.25 --glt 800 --glr 0.25 --gle 2 "
                             "--gls 0.25 --glsn 0.9 --glus 3,0.5,0.5,1 --nl 4")
    assert (spec.ds_depth_1, spec.ds_timesteps_1, spec.ds_depth_2, spec.ds_timesteps_2, spec.ds_ratio) == (
        2, 700, 5, 300, 0.25)
    assert (spec.gl_timesteps, spec.gl_ratio, spec.gl_every_n_steps, spec.gl_ratio_step, spec.gl_s_noise) == (
        800, 0.25, 2, 0.25, 0.9)
    assert spec.gl_unsharp_params == "3,0.5,0.5,1" and spec.negative_scale == 4.0
    assert parse_prompt_line("x --nl none").negative_scale == "none"
    assert parse_prompt_line("x").negative_scale is None


@pytest.mark.parametrize("line, position, message", [
    ("a cat --dsd1 two", 13, "--dsd1"),
    ("a cat --dsr 0", 12, "must be above 0"),
    ("a cat --gle 0", 12, "at least 1"),
    ("a cat --glus 3,1", 13, "ksize,sigma,strength"),
    ("a cat --glsx 1", 6, "unknown prompt option '--glsx'"),
])
def test_bad_prompt_option_values_point_at_the_position(line, position, message):
    with pytest.raises(PromptSyntaxError) as err:
        parse_prompt_line(line)
    assert err.value.position == position and message in str(err.value)


def test_prompt_options_resolve_over_the_flags_as_sd_scripts():
    off = DeepShrink()
    assert resolve_shrink(off, parse_prompt_line("x")) is None
    # any Deep Shrink option turns it on; depth 1 is --dsd1, else --ds_depth_1, else 3
    assert resolve_shrink(off, parse_prompt_line("x --dsr 0.3")) == DeepShrink(3, 650, None, 650, 0.3)
    flags = DeepShrink(5, 800, 7, 400, 0.5)
    assert resolve_shrink(flags, parse_prompt_line("x --dst1 900")) == DeepShrink(5, 900, 7, 400, 0.5)
    assert resolve_shrink(flags, parse_prompt_line("x --dsd1 1")) == DeepShrink(1, 800, 7, 400, 0.5)
    assert resolve_gradual(GradualLatent(), parse_prompt_line("x")) is None
    on = resolve_gradual(GradualLatent(), parse_prompt_line("x --glr 0.25 --glus 5,1,0.5,0"))
    assert (on.timesteps, on.ratio, on.every_n_steps) == (650, 0.25, 3)
    assert on.unsharp == parse_unsharp("5,1,0.5,0") and not on.unsharp.target_x
    assert resolve_gradual(GradualLatent(700), parse_prompt_line("x --glt 900")).timesteps == 900


def test_deep_shrink_depths_and_timesteps():
    s = DeepShrink(3, 650, 5, 300)
    assert [s.depth_at(t) for t in (999, 650, 649, 300, 299)] == [3, 3, 5, 5, None]
    assert DeepShrink(3, 650).depth_at(100) is None  # depth 2 unset: nothing below timesteps_1
    with pytest.raises(UserError, match="--ds_depth_1"):
        DeepShrink(9).check()
    with pytest.raises(UserError, match="--ds_ratio"):
        DeepShrink(3, ratio=0.0).check()


def test_unsharp_params_and_blur():
    assert parse_unsharp("3,0.5,0.5") == parse_unsharp("3,0.5,0.5,1")
    for bad in ("2,0.5,0.5", "3,0,0.5", "3,a,0.5", "3,0.5"):
        with pytest.raises(UserError, match="--gradual_latent_unsharp_params"):
            parse_unsharp(bad)
    impulse = torch.zeros(1, 1, 7, 7)
    impulse[0, 0, 3, 3] = 1.0
    blurred = gaussian_blur(impulse, 3, 0.8)[0, 0, 2:5, 2:5]  # an impulse gives the normalised 2-D kernel back
    k = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0]) / 0.8) ** 2)
    k = k / k.sum()
    assert torch.allclose(blurred, k[:, None] * k[None, :], atol=1e-6)


# ----------------------------------------------------------------------------------------------------- the formula


class _LinearUNet(torch.nn.Module):
    """A stand-in U-Net whose output depends on every conditioning input, called the way diffusers' SDXL
    pipelines call theirs."""

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        cond = encoder_hidden_states.mean(dim=(1, 2)) + added_cond_kwargs["text_embeds"].mean(1)
        cond = cond + added_cond_kwargs["time_ids"].mean(1)
        return (sample * cond[:, None, None, None] + cond[:, None, None, None] ** 2,)


def test_negative_scale_hooks_give_sd_scripts_formula():
    gen_ = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen_)
    emb = {k: torch.randn(2, 5, 6, generator=gen_) for k in ("neg", "cond", "empty")}
    pool = {k: torch.randn(2, 3, generator=gen_) for k in emb}
    ids = torch.randn(4, 6, generator=gen_)  # [negative, prompt] size conditioning
    unet, g, ns = _LinearUNet(), 7.0, 3.0

    def one(key: str, id_rows: torch.Tensor) -> torch.Tensor:
        return unet(x, 500, encoder_hidden_states=emb[key],
                    added_cond_kwargs={"text_embeds": pool[key], "time_ids": id_rows})[0]

    n, c, u = one("neg", ids[:2]), one("cond", ids[2:]), one("empty", ids[:2])  # u: the negative's conditioning
    with negative_scale_hooks(unet, ns, g, emb["empty"], pool["empty"]):
        pred = unet(torch.cat([x, x]), 500, encoder_hidden_states=torch.cat([emb["neg"], emb["cond"]]),
                    added_cond_kwargs={"text_embeds": torch.cat([pool["neg"], pool["cond"]]), "time_ids": ids})[0]
    assert pred.shape[0] == 4
    pn, pc = pred.chunk(2)
    guided = pn + g * (pc - pn)  # what the pipeline does with the two halves
    assert torch.allclose(guided, u + g * (c - u) - ns * (n - u), atol=1e-4)
    assert len(unet._forward_hooks) == len(unet._forward_pre_hooks) == 0  # removed after the call


def test_deep_shrink_hooks_leave_no_trace():
    from library.models.tiny import build_tiny_sdxl

    unet = build_tiny_sdxl(0).unet
    with deep_shrink_hooks(unet, DeepShrink(3, 500)):
        assert unet._forward_pre_hooks
    assert not unet._forward_pre_hooks and not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    with deep_shrink_hooks(unet, DeepShrink(None)):  # off: nothing is hooked at all
        assert not unet._forward_pre_hooks


# ----------------------------------------------------------------------------------------------------- images


def test_deep_shrink_changes_the_image_and_is_bit_identical_when_off(tmp_path, tiny_sdxl_file):
    base = gen(tiny_sdxl_file, tmp_path / "base")[0]
    unset = gen(tiny_sdxl_file, tmp_path / "unset", deep_shrink=DeepShrink(None, 500))[0]
    idle = gen(tiny_sdxl_file, tmp_path / "idle", deep_shrink=DeepShrink(3, 2000))[0]  # hooked, never shrinks
    assert max_diff(unset, base) == 0 and max_diff(idle, base) == 0
    shrunk = gen(tiny_sdxl_file, tmp_path / "ds", deep_shrink=DeepShrink(3, 500))[0]
    assert max_diff(shrunk, base) > 8
    two = gen(tiny_sdxl_file, tmp_path / "ds2", deep_shrink=DeepShrink(3, 700, 5, 400))[0]  # depth 5 at t=501
    one = gen(tiny_sdxl_file, tmp_path / "ds1", deep_shrink=DeepShrink(3, 700))[0]
    assert max_diff(two, one) > 0
    # the prompt's options: --dst1 alone turns it on at depth 3 (sd-scripts' default), as the flags would
    by_prompt, depth_0 = gen(tiny_sdxl_file, tmp_path / "p", prompts=(LINE + " --dst1 500", LINE + " --dsd1 0"))
    assert max_diff(by_prompt, shrunk) == 0
    assert max_diff(depth_0, shrunk) > 0 and max_diff(depth_0, base) > 0


def test_gradual_latent_changes_the_image_and_is_bit_identical_when_off(tmp_path, tiny_sdxl_file, caplog):
    size = 128  # latents of 16: they start at 8 and grow by multiples of 8
    base = gen(tiny_sdxl_file, tmp_path / "base", size=size)[0]
    unset = gen(tiny_sdxl_file, tmp_path / "unset", size=size, gradual_latent=GradualLatent(None, 0.5, 0.5, 1))[0]
    assert max_diff(unset, base) == 0
    flags = GradualLatent(900, 0.5, 0.5, 1)
    grown = gen(tiny_sdxl_file, tmp_path / "gl", size=size, gradual_latent=flags)[0]
    assert grown.shape == base.shape and max_diff(grown, base) > 8
    sharp = gen(tiny_sdxl_file, tmp_path / "glu", size=size,
                gradual_latent=GradualLatent(900, 0.5, 0.5, 1, 1.0, parse_unsharp("3,0.5,0.5,0")))[0]
    assert max_diff(sharp, grown) > 0
    by_prompt = gen(tiny_sdxl_file, tmp_path / "p", size=size, prompts=(LINE + " --glt 900 --gls 0.5 --gle 1",))[0]
    assert max_diff(by_prompt, grown) == 0
    # steps end before the full size: the image is smaller, with a warning (as sd-scripts, which says nothing)
    with caplog.at_level(logging.WARNING):
        short = gen(tiny_sdxl_file, tmp_path / "short", size=size, gradual_latent=GradualLatent(100))[0]
    assert short.shape == (64, 64, 3) and "smaller than asked" in caplog.text
    # other samplers: ignored with a warning, as in sd-scripts
    caplog.clear()
    ddim = gen(tiny_sdxl_file, tmp_path / "ddim", size=size, sampler="ddim")[0]
    with caplog.at_level(logging.WARNING):
        ignored = gen(tiny_sdxl_file, tmp_path / "ddim_gl", size=size, sampler="ddim", gradual_latent=flags)[0]
    assert max_diff(ignored, ddim) == 0 and "euler_a" in caplog.text


def test_negative_scale_changes_the_image_and_prompt_options_override_it(tmp_path, tiny_sdxl_file):
    base = gen(tiny_sdxl_file, tmp_path / "base")[0]
    scaled = gen(tiny_sdxl_file, tmp_path / "ns", negative_scale=20.0)[0]
    assert max_diff(scaled, base) > 8
    off, by_prompt = gen(tiny_sdxl_file, tmp_path / "nl", prompts=(LINE + " --nl none", LINE + " --nl 20"),
                         negative_scale=3.0)
    assert max_diff(off, base) == 0 and max_diff(by_prompt, scaled) == 0
    # with no negative prompt, n is the empty prompt u: u + g(c-u) - ns(n-u) is plain guidance from ""
    plain = gen(tiny_sdxl_file, tmp_path / "plain", prompts=("a red cube on a table",), max_embeddings_multiples=1)[0]
    no_neg = gen(tiny_sdxl_file, tmp_path / "noneg", prompts=("a red cube on a table",), negative_scale=20.0)[0]
    assert max_diff(no_neg, plain) <= 1


def test_controlled_or_regional_generation_refuses_size_changing_options(tiny_sdxl_file, tmp_path):
    from library.sample.generation import LLLiteSpec
    from library.sample.sdxl_generate import check_config

    config = GenerationConfig(model=tiny_sdxl_file, outdir=str(tmp_path), prompts=[parse_prompt_line("a --dsr 0.5")],
                              lllite=[LLLiteSpec(tiny_sdxl_file)], width=64, height=64)
    with pytest.raises(UserError, match="Deep Shrink .* cannot be combined with --control_net_lllite_models"):
        check_config(config)
    regional = GenerationConfig(model=tiny_sdxl_file, outdir=str(tmp_path), prompts=[parse_prompt_line("a --glt 800")],
                                mask_path=str(tmp_path), width=64, height=64)
    with pytest.raises(UserError, match="gradual latent .* cannot be combined with --mask_path"):
        check_config(regional)


# ----------------------------------------------------------------------------------------------------- the script


def test_cli_flags_prompt_overrides_and_metadata(tmp_path, tiny_sdxl_file):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{LINE}\n{LINE} --nl 2 --dsr 0.25 --glt 800\n")
    out = tmp_path / "out"
    r = run_script("sdxl_gen_img.py", "--ckpt", tiny_sdxl_file, "--outdir", str(out), "--from_file", str(prompts),
                   "--W", "128", "--H", "128", "--steps", "4", "--scale", "5", "--sampler", "k_euler_a",
                   "--seed", "3", "--device", "cpu", "--negative_scale", "4", "--ds_depth_1", "3",
                   "--ds_timesteps_1", "500", "--gradual_latent_timesteps", "900",
                   "--gradual_latent_ratio_step", "0.5", "--gradual_latent_every_n_steps", "1",
                   "--gradual_latent_unsharp_params", "3,0.5,0.5,1", "--sequential_file_name")
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = (read_png_info(out / f"im_{k:06d}.png") for k in (1, 2))
    assert first.extra["negative-scale"] == "4" and second.extra["negative-scale"] == "2"
    assert first.extra["deep_shrink"] == "depth 3/None, timesteps 500/650, ratio 0.5"
    assert second.extra["deep_shrink"] == "depth 3/None, timesteps 500/650, ratio 0.25"
    assert first.extra["gradual_latent"] == "timesteps 900, ratio 0.5, step 0.5 every 1, s_noise 1, unsharp 3,0.5,0.5,1"
    assert second.extra["gradual_latent"].startswith("timesteps 800, ")
    with Image.open(out / "im_000001.png") as im:
        assert im.size == (128, 128)


def test_cli_bad_values_name_the_flag(tmp_path, capsys, tiny_sdxl_file):
    from sdxl_gen_img import main

    base = ["--ckpt", tiny_sdxl_file, "--outdir", str(tmp_path / "o"), "--W", "64", "--H", "64"]
    for extra, flag in ((["--prompt", "a cat", "--ds_depth_1", "9"], "--ds_depth_1"),
                        (["--prompt", "a cat", "--gradual_latent_unsharp_params", "4,1,1"],
                         "--gradual_latent_unsharp_params"),
                        (["--prompt", "a cat", "--gradual_latent_timesteps", "600", "--gradual_latent_ratio", "1.5"],
                         "--gradual_latent_ratio"),
                        (["--prompt", "a cat --dsd1 12"], "--dsd1")):
        assert run_main(main, base + extra) == 1
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
