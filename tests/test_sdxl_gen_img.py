"""sdxl_gen_img.py: prompt-language batch generation on the tiny SDXL (64 px, 2 steps).

Most checks call the library in-process (one process imports diffusers once); the CLI itself is driven as a
subprocess where the user-visible contract matters (files written, error output).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script, save_random_lora
from library.cli import run_main
from library.prompts.language import parse_prompt_line
from library.prompts.png_metadata import read_png_info
from library.sample.generation import (
    GenerationConfig, LLLiteSpec, NetworkSpec, derive_seed, make_batches, plan_requests,
)
from library.sample.sdxl_generate import run_generation

SIZE = 64
STEPS = 2


def cfg(model: str, outdir: Path, prompts: list[str], **kw) -> GenerationConfig:
    values = dict(model=model, outdir=str(outdir), prompts=[parse_prompt_line(p) for p in prompts], width=SIZE,
                  height=SIZE, steps=STEPS, scale=5.0, seed=7, sampler="euler_a", device="cpu")
    values.update(kw)
    return GenerationConfig(**values)


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> str:
    """A LoRA on the tiny model (seed 0, as the fixtures' model) with random nonzero up weights."""
    from library.models.tiny import build_tiny_sdxl
    from networks.lora import create_network

    m = build_tiny_sdxl(0)
    net = create_network(1.0, 4, 4.0, m.vae, [m.text_encoder1, m.text_encoder2], m.unet)
    return save_random_lora(net, tmp_path_factory.mktemp("nets") / "lora.safetensors")


@pytest.fixture(scope="module")
def lllite_file(tmp_path_factory) -> str:
    from library.models.tiny import build_tiny_sdxl
    from networks.control_net_lllite import create_network

    m = build_tiny_sdxl(0)
    net = create_network(m.unet, cond_emb_dim=8, network_dim=8)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in net.unet_modules:
            module.up[0].weight.copy_(torch.randn(module.up[0].weight.shape, generator=gen))
            for layer in module.conditioning1:  # a strong response to the guide image, so guides can be told apart
                if isinstance(layer, torch.nn.Conv2d):
                    layer.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("nets") / "lllite.safetensors"
    net.save_weights(str(path))
    return str(path)


@pytest.fixture(scope="module")
def guides(tmp_path_factory) -> list[str]:
    """Two very different guide images (of another size: they are resized to the output size)."""
    root = tmp_path_factory.mktemp("guides")
    yy, xx = np.mgrid[0:96, 0:96]
    stripes = ((xx // 8) % 2 * 255).astype(np.uint8)
    a = root / "a_stripes.png"
    b = root / "b_dark.png"
    Image.fromarray(np.stack([stripes] * 3, -1)).save(a)
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(b)
    return [str(a), str(b)]


# ----------------------------------------------------------------------------------------------------- planning


def test_seeds_depend_on_run_seed_and_index_only():
    c = GenerationConfig(model="m", outdir="o", prompts=[parse_prompt_line("a {b|c|d} --d 5")], width=64, height=64,
                         images_per_prompt=3, n_iter=2)
    reqs = plan_requests(c, None, base_seed=11)
    assert [r.index for r in reqs] == list(range(6))
    assert reqs[0].seed == 5  # --d gives the first image's seed
    assert [r.seed for r in reqs[1:]] == [derive_seed(11, k) for k in range(1, 6)]
    assert plan_requests(c, None, 11) == reqs  # prompts are drawn reproducibly too
    assert len({r.seed for r in reqs}) == 6


def test_batches_group_only_compatible_requests():
    c = GenerationConfig(model="m", outdir="o", width=64, height=64, images_per_prompt=2,
                         prompts=[parse_prompt_line("a"), parse_prompt_line("b --w 128"), parse_prompt_line("c --n x")])
    reqs = plan_requests(c, None, 0)
    assert [[r.index for r in b] for b in make_batches(reqs, 4)] == [[0, 1], [2, 3], [4, 5]]
    assert [[r.index for r in b] for b in make_batches(reqs[:2], 1)] == [[0], [1]]


def test_cn_prompt_option_sets_control_image():
    spec = parse_prompt_line("a cat --cn guides/edge 1.png --n blurry")
    assert spec.control_image == "guides/edge 1.png"
    assert spec.negative_template.source == "blurry"


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_pngs_with_metadata_and_redraws_wildcards(tmp_path, tiny_sdxl_file):
    wc = tmp_path / "wc"
    wc.mkdir()
    (wc / "color.txt").write_text("\n".join(["red", "green", "blue", "yellow", "purple", "orange", "white"]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na __color__ {cube|ball|cone} --n blurry\nphoto of a __color__ house --l 3 --s 3\n")
    out = tmp_path / "out"
    r = run_script("sdxl_gen_img.py", "--ckpt", tiny_sdxl_file, "--outdir", str(out), "--from_file", str(prompts),
                   "--wildcards", str(wc), "--images_per_prompt", "3", "--batch_size", "2", "--W", "64", "--H", "64",
                   "--steps", "2", "--scale", "5", "--sampler", "euler_a", "--seed", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(out.glob("*.png"))
    assert len(files) == 6
    infos = [read_png_info(f) for f in files]
    assert [f.name.split("_")[2] for f in files] == [f"{k:06d}" for k in range(6)]  # generation order
    assert all(f.name.startswith("im_") and f.stem.endswith(f"_{i.seed}") for f, i in zip(files, infos))
    first, second = infos[:3], infos[3:]
    assert all(i.negative_prompt == "blurry" and i.steps == 2 and i.scale == 5 for i in first)
    assert all(i.negative_prompt == "" and i.steps == 3 and i.scale == 3 for i in second)
    assert all(i.sampler == "euler_a" and (i.width, i.height) == (64, 64) for i in infos)
    assert len({i.prompt for i in infos}) >= 4, [i.prompt for i in infos]  # each image draws its own prompt
    assert all("__" not in i.prompt and "{" not in i.prompt for i in infos)
    assert len({i.seed for i in infos}) == 6
    with Image.open(files[0]) as im:
        assert "Steps: 2, Sampler: Euler a, CFG scale: 5, Seed:" in im.text["parameters"]
    # progress with ETA: one bar over the run's images, one over each batch's denoising steps
    assert "images: 100%" in r.stderr and "6/6 [" in r.stderr, r.stderr[-2000:]
    assert "batch 1/4 steps" in r.stderr and "batch 4/4 steps" in r.stderr, r.stderr[-2000:]


def test_cli_missing_model_is_one_line_error(tmp_path):
    r = run_script("sdxl_gen_img.py", "--ckpt", str(tmp_path / "nope.safetensors"), "--outdir", str(tmp_path / "o"),
                   "--prompt", "a cat", "--W", "64", "--H", "64")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "nope.safetensors" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")


def _main(argv):
    from sdxl_gen_img import main

    return run_main(main, argv)


def test_malformed_prompt_reports_file_line_and_position(tmp_path, capsys, tiny_sdxl_file):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a good line\na {broken|line\n")
    rc = _main(["--ckpt", tiny_sdxl_file, "--outdir", str(tmp_path / "o"), "--from_file", str(prompts)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "p.txt line 2" in err and "position 2" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_guide_image_is_reported_before_loading(tmp_path, capsys, lllite_file):
    rc = _main(["--ckpt", str(tmp_path / "model-not-needed-yet"), "--outdir", str(tmp_path / "o"),
                "--prompt", "a cat --cn " + str(tmp_path / "missing.png"), "--W", "64", "--H", "64",
                "--control_net_lllite_models", lllite_file])
    err = capsys.readouterr().err
    assert rc == 1 and "missing.png" in err and "does not exist" in err and "Traceback" not in err
    rc = _main(["--ckpt", "m", "--outdir", str(tmp_path / "o"), "--prompt", "a cat", "--W", "64", "--H", "64",
                "--control_net_lllite_models", lllite_file, "--guide_image_path", str(tmp_path / "nodir")])
    assert rc == 1 and "--guide_image_path" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- images


def test_same_seed_same_image_whatever_the_batch_size(tmp_path, tiny_sdxl_file):
    prompts = ["a {red|green} cube --n dark", "a ball"]
    one = run_generation(cfg(tiny_sdxl_file, tmp_path / "b1", prompts, images_per_prompt=2, batch_size=1))
    two = run_generation(cfg(tiny_sdxl_file, tmp_path / "b2", prompts, images_per_prompt=2, batch_size=2,
                             vae_batch_size=1))
    assert len(one) == len(two) == 4
    a, b = pixels(one), pixels(two)
    for x, y in zip(a, b):
        assert max_diff(x, y) <= 1  # float rounding of batched matmuls may move a pixel value by one
    assert max_diff(a[0], a[1]) > 10  # different seeds, different images
    assert [read_png_info(p).prompt for p in one] == [read_png_info(p).prompt for p in two]


def test_lora_multiplier_zero_is_base_one_changes_and_merge_matches(tmp_path, tiny_sdxl_file, lora_file):
    def gen(name, prompts=("a red cube",), **kw):
        return pixels(run_generation(cfg(tiny_sdxl_file, tmp_path / name, list(prompts), **kw)))[0]

    base = gen("base")
    zero = gen("zero", networks=[NetworkSpec("networks.lora", lora_file, 0.0)])
    one = gen("one", networks=[NetworkSpec("networks.lora", lora_file, 1.0)])
    merged = gen("merged", networks=[NetworkSpec("networks.lora", lora_file, 1.0)], network_merge=True)
    am_zero = gen("am", prompts=["a red cube --am 0"],
                  networks=[NetworkSpec("networks.lora", lora_file, 1.0)])
    assert max_diff(base, zero) == 0
    assert max_diff(base, am_zero) == 0  # per-prompt --am overrides --network_mul
    assert max_diff(base, one) > 10
    assert max_diff(one, merged) <= 2


def test_lllite_changes_image_and_follows_guide(tmp_path, tiny_sdxl_file, lllite_file, guides):
    guide_dir = Path(guides[0]).parent

    def gen(name, prompts, **kw):
        return pixels(run_generation(cfg(tiny_sdxl_file, tmp_path / name, prompts, **kw)))

    base = gen("base", ["a house"])[0]
    lllite = [LLLiteSpec(lllite_file, 1.0)]
    cycled = gen("cycled", ["a house"], images_per_prompt=2, seed=7, lllite=lllite, guide_image_path=str(guide_dir),
                 batch_size=2)
    # image 0 uses guide a; with guide b forced by --cn the same seed gives another image
    via_cn = gen("cn", ["a house --cn " + guides[1]], lllite=lllite, guide_image_path=str(guide_dir))[0]
    assert max_diff(base, cycled[0]) > 10
    assert max_diff(cycled[0], via_cn) > 10
    silent = gen("silent", ["a house"], lllite=[LLLiteSpec(lllite_file, 0.0)], guide_image_path=guides[0])[0]
    assert max_diff(base, silent) == 0


def test_img2img_runs_and_follows_strength(tmp_path, tiny_sdxl_file, guides):
    def gen(name, strength):
        paths = run_generation(cfg(tiny_sdxl_file, tmp_path / name, ["a house"], steps=4, image_path=guides[0],
                                   strength=strength))
        return paths[0], pixels(paths)[0]

    path, low = gen("low", 0.5)
    _, high = gen("high", 1.0)
    info = read_png_info(path)
    assert info.extra["init_image"] == guides[0] and info.extra["strength"] == "0.5"
    assert low.shape == (SIZE, SIZE, 3)
    assert max_diff(low, high) > 0
