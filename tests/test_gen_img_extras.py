"""sdxl_gen_img.py (issue #17): --textual_inversion_embeddings, --vae, --clip_vision_strength, --interactive,
--mask_path with --network_regional_mask_max_color_codes (regional LoRA) and --sampler's sd-scripts choices.
Tiny SDXL, 64 px, 2 steps."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO, run_script
from library.errors import ModelLoadError
from library.prompts.png_metadata import read_png_info
from library.prompts.samplers import SD_SCRIPTS_SAMPLER_CHOICES, canonical_sampler_name
from library.sample.regional_mask import latent_resolutions, region_of
from library.sample.textual_inversion import Embedding, TokenExpander, read_embedding
from test_sdxl_gen_img import guides, lora_file, max_diff, pixels  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ("--W", "64", "--H", "64", "--steps", "2", "--scale", "5", "--sampler", "euler_a", "--device", "cpu")


def gen(model: str, outdir, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    if stdin is None:
        return run_script("sdxl_gen_img.py", "--ckpt", model, "--outdir", str(outdir), *BASE, *args)
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "sdxl_gen_img.py"), "--ckpt", model, "--outdir", str(outdir),
                           *BASE, *args], input=stdin, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=600)


def pngs(outdir) -> list:
    return sorted(outdir.glob("*.png"))


@pytest.fixture(scope="module")
def tiny_widths() -> tuple[int, int]:
    from library.models.tiny import build_tiny_sdxl

    m = build_tiny_sdxl(0)
    return (m.text_encoder1.get_input_embeddings().weight.shape[1],
            m.text_encoder2.get_input_embeddings().weight.shape[1])


def write_embedding(path, widths, vectors: int = 2, seed: int = 0, **extra) -> str:
    g = torch.Generator().manual_seed(seed)
    tensors = {"clip_l": torch.randn(vectors, widths[0], generator=g) * 3,
               "clip_g": torch.randn(vectors, widths[1], generator=g) * 3, **extra}
    save_file(tensors, str(path))
    return str(path)


# ----------------------------------------------------------------------------------------------------- no model


def test_sampler_flag_takes_exactly_sd_scripts_choices():
    from library.sample.gen_args import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if "--sampler" in a.option_strings)
    assert list(action.choices) == list(SD_SCRIPTS_SAMPLER_CHOICES) and action.default == "ddim"
    for name in SD_SCRIPTS_SAMPLER_CHOICES:  # every sd-scripts name still runs a sampler here
        assert parser.parse_args(["--sampler", name]).sampler == name
        canonical_sampler_name(name)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sampler", "k_heun"])  # not one of sd-scripts' generator choices


def test_token_expands_to_its_vectors_longest_match_first():
    emb = Embedding("MyTok", "x", (torch.zeros(3, 4), torch.zeros(3, 8)))
    single = Embedding("solo", "y", (torch.zeros(1, 4), torch.zeros(1, 8)))
    expander = TokenExpander([emb, single])
    assert emb.token_strings() == ["MyTok", "MyTok1", "MyTok2"]
    assert expander.expand("a mytok, (MyTok:1.2) solo") == "a MyTok MyTok1 MyTok2, (MyTok MyTok1 MyTok2:1.2) solo"
    assert expander.expand("MyTok2 alone") == "MyTok2 alone"  # a numbered token names one vector
    assert not TokenExpander([single]) and TokenExpander([single]).expand("solo") == "solo"


def test_malformed_embedding_files_name_the_file_and_the_problem(tmp_path, tiny_widths):
    only_l = tmp_path / "only_l.safetensors"
    save_file({"clip_l": torch.zeros(1, tiny_widths[0])}, str(only_l))
    with pytest.raises(ModelLoadError, match=r"only_l\.safetensors.*no 'clip_g' tensor"):
        read_embedding(str(only_l), tiny_widths)
    wide = write_embedding(tmp_path / "wide.safetensors", (tiny_widths[0] + 1, tiny_widths[1]))
    with pytest.raises(ModelLoadError, match=r"wide\.safetensors.*'clip_l' has shape"):
        read_embedding(wide, tiny_widths)
    wrapped = tmp_path / "wrapped.pt"  # a torch file in sd-scripts' string_to_param wrapping reads the same
    torch.save({"string_to_param": {"clip_l": torch.ones(2, tiny_widths[0]), "clip_g": torch.ones(2, tiny_widths[1])}},
               wrapped)
    emb = read_embedding(str(wrapped), tiny_widths)
    assert emb.token == "wrapped" and emb.num_vectors == 2
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"junk\.safetensors.*cannot read"):
        read_embedding(str(tmp_path / "junk.safetensors"), tiny_widths)


def test_region_rules_follow_sd_scripts():
    rgb = np.zeros((4, 8, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)  # left: red = code 1
    rgb[:, 4:] = (255, 255, 0)  # right: yellow = code 3
    rgb[0, 0] = (0, 255, 0)  # one green pixel = code 2
    by_code = [region_of(rgb, i, 3) for i in range(4)]
    assert by_code[0][:, :4].sum() == 15 and by_code[0][:, 4:].sum() == 0
    assert by_code[1].sum() == 1 and by_code[1][0, 0] == 1
    assert by_code[2][:, 4:].all() and not by_code[2][:, :4].any()
    assert by_code[3].all()  # beyond --network_regional_mask_max_color_codes: everywhere
    by_channel = [region_of(rgb, i, None) for i in range(4)]
    assert by_channel[0][1, 0] == 1 and by_channel[0][0, 0] == 0  # red channel
    assert by_channel[2].all()  # blue channel empty: an empty region means everywhere, as sd-scripts
    assert by_channel[3].all()  # a 4th network has no channel
    assert latent_resolutions(64, 64)[:4] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert (5, 9) in latent_resolutions(72, 40) and (6, 10) in latent_resolutions(72, 40)  # (h, w), odd rounded up


# ----------------------------------------------------------------------------------------------------- regional


def half_mask(path, color=(255, 0, 0), width: int = 32) -> str:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :width] = color
    Image.fromarray(rgb).save(path)
    return str(path)


def test_regional_gates_zero_the_lora_outside_its_region(tmp_path, lora_file):  # noqa: F811
    """Every U-Net LoRA update of network 1 is zero in the right half and not in the left; text-side ones are off."""
    from library.models.tiny import build_tiny_sdxl
    from library.sample.regional_mask import attach_regions
    from networks.attach import attach_network_file

    m = build_tiny_sdxl(0)
    net = attach_network_file("networks.lora", lora_file, 1.0, m.vae, [m.text_encoder1, m.text_encoder2], m.unet,
                              False, torch.device("cpu"), torch.float32)
    regions = attach_regions([net], half_mask(tmp_path / "mask.png"), None)
    regions.set_size(64, 64)
    seen: dict[str, torch.Tensor] = {}
    for lora in net.unet_loras:  # registered after the gate: sees the gated update
        lora.lora_up.register_forward_hook(lambda mod, i, out, name=lora.lora_name: seen.setdefault(name, out))
    latents = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, m.unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, m.text_encoder2.config.projection_dim),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        m.unet(latents, 10, encoder_hidden_states=text, added_cond_kwargs=added)
    spatial = 0
    for name, out in seen.items():
        if "attn2_to_k" in name or "attn2_to_v" in name:
            assert not out.any(), name
            continue
        grid = out if out.dim() == 4 else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], *next(
            (h, w) for h, w in latent_resolutions(64, 64) if h * w == out.shape[1]))
        half = grid.shape[-1] // 2
        if half == 0:
            continue
        spatial += 1
        assert grid[..., half:].abs().max() < 1e-6, name  # right half: untouched (the mask is 0 there)
        assert grid[..., :half].abs().max() > 1e-4, name
    assert spatial > 10
    regions.remove()


def test_cli_regional_mask_keeps_the_lora_to_its_colour(tmp_path, tiny_sdxl_file, lora_file):  # noqa: F811
    """Through the script: the region changes the image (half vs whole vs none). On a 64-px tiny model attention and
    convolutions mix the whole 8x8 latent, so the confinement itself is checked in the modules (test above)."""
    prompt = ("--prompt", "a cube --d 5")
    images = {}
    for name, mask in (("none", None), ("left", half_mask(tmp_path / "left.png")),
                       ("all", half_mask(tmp_path / "all.png", width=64))):
        extra = () if mask is None else ("--network_module", "networks.lora", "--network_weights", lora_file,
                                         "--mask_path", mask, "--network_regional_mask_max_color_codes", "1")
        r = gen(tiny_sdxl_file, tmp_path / name, *prompt, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        if mask is not None:
            assert r.stderr.count("text-encoder / cross-attention key-value LoRA module(s)") == 1
        images[name] = pixels(pngs(tmp_path / name))[0]
    assert max_diff(images["left"], images["none"]) > 10 and max_diff(images["all"], images["left"]) > 10


def test_cli_mask_without_networks_needs_an_init_image(tmp_path, tiny_sdxl_file):
    r = gen(tiny_sdxl_file, tmp_path / "o", "--prompt", "a", "--mask_path", half_mask(tmp_path / "m.png"))
    assert r.returncode != 0 and "--mask_path without --network_weights is an inpainting mask" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_inpainting_mask_keeps_the_black_area(tmp_path, tiny_sdxl_file, guides):
    """sd-scripts' --mask_path for img2img: black is kept from the init image, white is redrawn."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube --d 4\na green forest at night --d 4\n")
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(black)
    images = {}
    for name, mask in (("keep", str(black)), ("redraw_left", half_mask(tmp_path / "left.png", (255, 255, 255)))):
        r = gen(tiny_sdxl_file, tmp_path / name, "--from_file", str(prompts), "--image_path", guides[0],
                "--strength", "1.0", "--mask_path", mask, "--sequential_file_name")
        assert r.returncode == 0, r.stderr[-3000:]
        images[name] = pixels(pngs(tmp_path / name))
    assert read_png_info(pngs(tmp_path / "keep")[0]).extra["mask_path"] == str(black)
    assert max_diff(*images["keep"]) == 0  # nothing to redraw: the prompt cannot change the image
    assert max_diff(*images["redraw_left"]) > 10


# ----------------------------------------------------------------------------------------------------- TI, VAE


def test_cli_textual_inversion_token_changes_the_image(tmp_path, tiny_sdxl_file, tiny_widths):
    emb = write_embedding(tmp_path / "zqxstyle.safetensors", tiny_widths, vectors=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cube --d 3\na zqxstyle cube --d 3\n")
    with_ti, without = tmp_path / "ti", tmp_path / "plain"
    r = gen(tiny_sdxl_file, with_ti, "--from_file", str(prompts), "--sequential_file_name",
            "--textual_inversion_embeddings", emb)
    assert r.returncode == 0, r.stderr[-3000:]
    r = gen(tiny_sdxl_file, without, "--from_file", str(prompts), "--sequential_file_name")
    assert r.returncode == 0, r.stderr[-3000:]
    (cube, token), (cube0, token0) = pixels(pngs(with_ti)), pixels(pngs(without))
    assert max_diff(cube, cube0) == 0  # loading embeddings leaves other prompts alone
    assert max_diff(token, cube) > 10 and max_diff(token, token0) > 10  # the token's vectors condition the image
    info = read_png_info(pngs(with_ti)[1])
    assert info.prompt == "a zqxstyle cube" and info.extra["textual_inversion"] == "zqxstyle"  # as written


def test_textual_inversion_tokens_and_vectors_in_both_encoders(tmp_path, tiny_widths):
    from library.models.tiny import build_tiny_sdxl
    from library.sample.textual_inversion import load_textual_inversion

    m = build_tiny_sdxl(0)
    path = write_embedding(tmp_path / "zqxstyle.safetensors", tiny_widths, vectors=3, seed=1)
    vectors = read_embedding(path, tiny_widths).vectors
    tokenizers, encoders = [m.tokenizer1, m.tokenizer2], [m.text_encoder1, m.text_encoder2]
    expander = load_textual_inversion([path], tokenizers, encoders)
    for tok, enc, vec in zip(tokenizers, encoders, vectors):
        ids = tok(expander.expand("a zqxstyle")).input_ids
        assert ids[2:5] == tok.convert_tokens_to_ids(["zqxstyle", "zqxstyle1", "zqxstyle2"])
        assert torch.equal(enc.get_input_embeddings().weight[ids[2:5]], vec)
    with pytest.raises(Exception, match="already taken"):
        load_textual_inversion([path], tokenizers, encoders)


def test_cli_bad_embedding_file_is_one_clear_error(tmp_path, tiny_sdxl_file, tiny_widths):
    bad = tmp_path / "broken.safetensors"
    save_file({"emb_params": torch.zeros(1, tiny_widths[0])}, str(bad))
    r = gen(tiny_sdxl_file, tmp_path / "o", "--prompt", "a broken", "--textual_inversion_embeddings", str(bad))
    assert r.returncode != 0 and "broken.safetensors" in r.stderr and "clip_l" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_vae_decodes_and_clip_vision_strength_warns_once(tmp_path, tiny_sdxl_file):
    from library.models import sdxl_keys
    from library.models.tiny import build_tiny_sdxl

    def vae_file(seed: int):
        ldm = sdxl_keys.diffusers_vae_to_ldm(build_tiny_sdxl(seed).vae.state_dict())
        path = tmp_path / f"vae{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in ldm.items()}, str(path))
        return str(path)

    same = tmp_path / "vae_folder"  # a diffusers folder keeps the tiny VAE's config (8 norm groups) exactly
    build_tiny_sdxl(0).vae.save_pretrained(same)
    runs = {}
    for name, extra in (("model", ()), ("same", ("--vae", str(same))),
                        ("other", ("--vae", vae_file(5), "--clip_vision_strength", "0.5"))):
        r = gen(tiny_sdxl_file, tmp_path / name, "--prompt", "a cube --d 2", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = (pixels(pngs(tmp_path / name))[0], r.stderr)
    assert max_diff(runs["same"][0], runs["model"][0]) == 0  # the model's own VAE given again: same image
    assert max_diff(runs["other"][0], runs["model"][0]) > 10
    assert read_png_info(pngs(tmp_path / "other")[0]).extra["vae"] == "vae5.safetensors"
    assert runs["other"][1].count("--clip_vision_strength has no effect here") == 1
    r = gen(tiny_sdxl_file, tmp_path / "x", "--prompt", "a", "--vae", str(tmp_path / "missing.safetensors"))
    assert r.returncode != 0 and "--vae" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------- interactive


def test_cli_interactive_reads_prompts_from_stdin(tmp_path, tiny_sdxl_file):
    out = tmp_path / "out"
    r = gen(tiny_sdxl_file, out, "--interactive", "--sequential_file_name",
            stdin="a red cube --d 1\n\n{unclosed\na blue sphere --d 2\n")
    assert r.returncode == 0, r.stderr[-3000:]
    files = pngs(out)
    assert [read_png_info(f).prompt for f in files] == ["a red cube", "a blue sphere"]
    assert [read_png_info(f).seed for f in files] == [1, 2]
    assert [f.name for f in files] == ["im_000001.png", "im_000002.png"]  # indices go on across lines
    assert "stdin line 3" in r.stderr  # the bad line is reported and skipped
    assert r.stderr.count("Type prompt:") == 5  # asked before each line and once more at the end of input
    r = gen(tiny_sdxl_file, out, "--interactive", "--prompt", "a", stdin="")
    assert r.returncode != 0 and "--interactive reads the prompts from stdin" in r.stderr


# ----------------------------------------------------------------------------------------------------- FLUX


def test_flux_sdxl_only_prompt_options_warn_once_each():
    from library.config.environment_flags import _SAID
    from library.prompts.language import parse_prompt_line
    from library.sample.flux_prompt_options import warn_ignored_flux_options

    _SAID.clear()
    specs = [parse_prompt_line("a --n b --ow 128 --d 3"), parse_prompt_line("c --n d --ct 8")]
    assert warn_ignored_flux_options(specs) == ["--n", "--ow", "--ct"]
    assert warn_ignored_flux_options([parse_prompt_line("a --w 64 --h 64 --s 2 --l 3 --f x.png")]) == []


def test_flux_interactive_reads_prompts_and_ignores_sdxl_options_with_a_warning(tmp_path, tiny_flux_single):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, str(REPO / "flux_gen_img.py"), "--pretrained_model_name_or_path", tiny_flux_single,
         "--outdir", str(out), "--W", "64", "--H", "64", "--steps", "2", "--device", "cpu",
         "--t5xxl_max_token_length", "16", "--interactive"],
        input="a circle --d 1 --n blurry --ow 128\na square --d 2 --n dark\n", env=env, cwd=str(REPO),
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    infos = sorted((read_png_info(f) for f in out.glob("*.png")), key=lambda i: i.seed)
    assert [(i.prompt, i.seed) for i in infos] == [("a circle", 1), ("a square", 2)]
    assert r.stderr.count("--n (first on the prompt) is ignored by flux_gen_img.py") == 1
    assert r.stderr.count("--ow (first on the prompt) is ignored") == 1
