"""sdxl_gen_img.py as a drop-in for sd-scripts' command lines: environment-only flags, long and weighted prompts,
SDXL conditioning flags, file naming and seeds, network flags (issue #17). Tiny SDXL, 64 px, 2 steps."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_script
from library.prompts.language import parse_prompt_line
from library.prompts.png_metadata import read_png_info
from library.prompts.weighting import has_attention_syntax, parse_attention
from library.sample.generation import GenerationConfig, derive_seed, plan_requests
from library.sample.sdxl_generate import run_generation
from test_sdxl_gen_img import cfg, guides, lllite_file, lora_file, max_diff, pixels  # noqa: F401 (fixtures)

# ----------------------------------------------------------------------------------------------------- no model


def test_attention_weights_follow_sd_scripts_rules():
    assert parse_attention("plain text") == [("plain text", 1.0)]
    runs = dict(parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun"))
    assert runs["house"] == pytest.approx(1.3 * 1.1 * 1.1)
    assert runs["on"] == pytest.approx(1.0) and runs["hill"] == pytest.approx(0.55)
    assert parse_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_attention("(unclosed") == [("unclosed", pytest.approx(1.1))]
    assert parse_attention("[less]") == [("less", pytest.approx(1 / 1.1))]
    assert parse_attention("a:b) c") == [("a:b) c", 1.0)]  # a closer without opener is text
    assert [r[0] for r in parse_attention("x BREAK y")] == ["x ", "BREAK", " y"]
    assert not has_attention_syntax("a cat, 8k") and has_attention_syntax("(solo)")


def test_iter_same_seed_shares_one_seed_per_pass_and_d_still_wins():
    c = GenerationConfig(model="m", outdir="o", prompts=[parse_prompt_line("a"), parse_prompt_line("b --d 5")],
                         width=64, height=64, images_per_prompt=2, n_iter=2, iter_same_seed=True)
    reqs = plan_requests(c, None, base_seed=3)
    first, second = reqs[:4], reqs[4:]
    assert [r.seed for r in first] == [first[0].seed, first[0].seed, 5, first[0].seed]
    assert first[0].seed == derive_seed(3, 0, "iteration") and second[0].seed == derive_seed(3, 1, "iteration")
    assert first[0].seed != second[0].seed


def test_clip_prompt_option_and_vae_batch_fraction():
    spec = parse_prompt_line("a cat --c a photo of a cat --n dog")
    assert spec.clip_prompt == "a photo of a cat" and spec.negative_template.source == "dog"
    c = GenerationConfig(model="m", outdir="o", prompts=[spec], batch_size=4, vae_batch_size=0.5)
    assert c.vae_batch_size == 2


# ----------------------------------------------------------------------------------------------------- CLI


def test_documented_lllite_command_runs_and_warns_once_per_environment_flag(tmp_path, tiny_sdxl_file, lllite_file,
                                                                         guides):
    """sd-scripts' LLLite docs generate a data set with this command line (sizes and counts made tiny)."""
    out = tmp_path / "out"
    r = run_script(
        "sdxl_gen_img.py", "--ckpt", tiny_sdxl_file, "--n_iter", "1", "--scale", "10", "--steps", "2",
        "--outdir", str(out), "--xformers", "--W", "64", "--H", "64", "--original_width", "128",
        "--original_height", "128", "--sampler", "ddim", "--batch_size", "2", "--vae_batch_size", "0.5",
        "--images_per_prompt", "2", "--max_embeddings_multiples", "1", "--diffusers_xformers",
        "--opt_channels_last", "--vae_slices", "4", "--no_half_vae", "--no_preview", "--clip_skip", "2",
        "--prompt", "{portrait|anime screen cap} of 1girl, { |, dynamic pose}, (solo), {0-1$$smile,|blush,} "
                    "--n lowres, low quality",
        "--guide_image_path", guides[0], "--control_net_lllite_models", lllite_file, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    info = read_png_info(files[0])
    assert info.extra["max_embeddings_multiples"] == "1" and info.extra["original_width"] == "128"
    assert "(solo)" in info.prompt and "{" not in info.prompt
    for flag in ("--xformers", "--diffusers_xformers", "--opt_channels_last", "--vae_slices", "--clip_skip"):
        assert r.stderr.count(f"{flag} has no effect here") == 1, (flag, r.stderr[-3000:])
    assert "--no_preview" not in r.stderr  # nothing to warn about: we never preview


def test_sequential_names_show_meta_and_merge_n_models(tmp_path, tiny_sdxl_file, lora_file):
    out = tmp_path / "seq"
    r = run_script("sdxl_gen_img.py", "--ckpt", tiny_sdxl_file, "--outdir", str(out), "--prompt", "a cube --c cube",
                   "--images_per_prompt", "2", "--W", "64", "--H", "64", "--steps", "2", "--seed", "1",
                   "--sequential_file_name", "--network_weights", lora_file, "--network_merge_n_models", "1",
                   "--network_show_meta", "--crop_top", "8", "--original_width_negative", "32", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["im_000001.png", "im_000002.png"]
    assert f"metadata of {lora_file}" in r.stdout and "merged" in r.stderr
    info = read_png_info(out / "im_000001.png")
    assert info.extra["clip_prompt"] == "cube" and info.extra["crop_top"] == "8"
    assert info.extra["original_width_negative"] == "32" and info.extra["original_height_negative"] == "64"


# ----------------------------------------------------------------------------------------------------- images

WORDS = ("cat dog red blue green house tree car sky sun moon star river lake road city girl boy hat shoe "
         "book lamp door wall fire snow rain wind leaf rock").split()


def _words_prompt(tokens: int) -> str:
    from library.models.tokenizers import load_sdxl_tokenizers

    tok = load_sdxl_tokenizers()[0]
    words = [WORDS[i % len(WORDS)] for i in range(tokens)]
    assert len(tok(" ".join(words)).input_ids) == tokens + 2  # one token per word
    return " ".join(words)


def test_long_prompt_uses_tokens_beyond_75_and_mem_1_truncates(tmp_path, tiny_sdxl_file):
    long_prompt = _words_prompt(150)
    first_75 = " ".join(long_prompt.split()[:75])

    def gen(name, prompt, mem):
        return pixels(run_generation(cfg(tiny_sdxl_file, tmp_path / name, [prompt],
                                         max_embeddings_multiples=mem)))[0]

    truncated = gen("t", first_75, 2)
    long2 = gen("l2", long_prompt, 2)
    long1 = gen("l1", long_prompt, 1)
    assert max_diff(long1, truncated) == 0  # 75 tokens kept, the same embedding as the short prompt
    assert max_diff(long2, truncated) > 0  # the second chunk reaches the U-Net


def test_attention_weight_changes_the_image_and_weight_one_does_not(tmp_path, tiny_sdxl_file):
    def gen(name, prompt, **kw):
        return pixels(run_generation(cfg(tiny_sdxl_file, tmp_path / name, [prompt], **kw)))[0]

    plain = gen("plain", "a red cube on a table", max_embeddings_multiples=1)
    weight_one = gen("one", "a (red cube:1.0) on a table")
    heavy = gen("heavy", "a (red cube:1.6) on a table")
    assert max_diff(plain, weight_one) == 0
    assert max_diff(plain, heavy) > 0


def test_sdxl_negative_size_and_crop_conditioning_change_the_image(tmp_path, tiny_sdxl_file):
    def gen(name, prompt="a red cube --n blurry", **kw):
        return pixels(run_generation(cfg(tiny_sdxl_file, tmp_path / name, [prompt], **kw)))[0]

    base = gen("base")
    assert max_diff(base, gen("crop", crop_top=32)) > 0
    assert max_diff(base, gen("nw", original_width_negative=512, original_height_negative=512)) > 0
    assert max_diff(base, gen("nw_prompt", prompt="a red cube --n blurry --nw 512 --nh 512")) > 0


def test_use_original_file_name_names_img2img_outputs_after_their_init_images(tmp_path, tiny_sdxl_file, guides):
    out = tmp_path / "orig"
    paths = run_generation(cfg(tiny_sdxl_file, out, ["a house"], images_per_prompt=2,
                               image_path=str(Path(guides[0]).parent), use_original_file_name=True))
    assert sorted(p.name for p in paths) == sorted(Path(g).stem + ".png" for g in guides)


def test_highres_fix_writes_upscaled_images_and_the_first_pass(tmp_path, tiny_sdxl_file):
    out = tmp_path / "hr"
    r = run_script("sdxl_gen_img.py", "--ckpt", tiny_sdxl_file, "--outdir", str(out), "--prompt", "a red cube",
                   "--W", "128", "--H", "96", "--steps", "2", "--seed", "1", "--highres_fix_scale", "0.5",
                   "--highres_fix_steps", "2", "--highres_fix_save_1st", "--sequential_file_name",
                   "--highres_fix_upscaler", "some.module", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("--highres_fix_upscaler has no effect here") == 1
    small, final = out / "im_0000001.png", out / "im_1000001.png"
    assert sorted(p.name for p in out.glob("*.png")) == [small.name, final.name]
    first, second = read_png_info(small), read_png_info(final)
    assert (first.width, first.height) == (64, 32)  # half size, rounded down to multiples of 32
    assert (second.width, second.height) == (128, 96) and second.extra["highres_fix_scale"] == "0.5"
    assert second.seed == first.seed + 1 and first.steps == 2
    from PIL import Image

    with Image.open(final) as im:
        assert im.size == (128, 96)


def test_highres_fix_latent_upscaling_runs_and_differs_from_pixel_upscaling(tmp_path, tiny_sdxl_file):
    from library.sample.highres_fix import HighresFix

    def gen(name, latents):
        fix = HighresFix(0.5, steps=2, latents_upscaling=latents)
        return pixels(run_generation(cfg(tiny_sdxl_file, tmp_path / name, ["a red cube"], highres_fix=fix)))[0]

    lat, pix = gen("lat", True), gen("pix", False)
    assert lat.shape == pix.shape == (64, 64, 3)
    assert max_diff(lat, pix) > 0


def test_prompt_file_name_option_and_flux_rejects_negative_scale(tmp_path):
    from library.errors import UserError
    from library.sample.generation import output_stem, reject_unet_prompt_options

    c = GenerationConfig(model="m", outdir="o", width=64, height=64, prompts=[parse_prompt_line("a --f cube.png")])
    req = plan_requests(c, None, 0)[0]
    assert output_stem(c, req, "stamp") == "cube"
    bad = GenerationConfig(model="m", outdir="o", prompts=[replace(parse_prompt_line("a --nl 2"), line_no=4)])
    with pytest.raises(UserError, match="prompt line 4: --nl"):  # SDXL honours it (tests/test_gen_unet_options.py)
        reject_unet_prompt_options(bad, "FLUX")


def test_network_args_are_parsed_per_network():
    from library.errors import UserError
    from library.sample.gen_args import build_parser, config_from_args

    args = build_parser().parse_args(["--ckpt", "m", "--prompt", "a", "--network_weights", "a.safetensors",
                                      "b.safetensors", "--network_args", "conv_dim=4;conv_alpha=1", ""])
    specs = config_from_args(args).networks
    assert specs[0].args == (("conv_dim", "4"), ("conv_alpha", "1")) and specs[1].args == ()
    args.network_args = ["conv_dim"]
    with pytest.raises(UserError, match="key=value"):
        config_from_args(args)
