"""flux_gen_img.py on the tiny FLUX (64 px, 2 steps): PNGs with metadata, LoRA multipliers, Kontext edits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script, save_random_lora
from PIL import Image

from library.cli import run_main
from library.prompts.language import parse_prompt_line
from library.prompts.png_metadata import read_png_info
from library.sample.flux_generate import FluxGenerationConfig, FluxOptions, run_flux_generation
from library.sample.generation import GenerationConfig, NetworkSpec

SIZE = 64
STEPS = 2


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory) -> str:
    from library.models.tiny_flux import build_tiny_flux
    from networks.lora_flux import create_network

    m = build_tiny_flux(0)
    net = create_network(1.0, 4, 4.0, m.ae, [m.clip_l, m.t5], m.transformer)
    return save_random_lora(net, tmp_path_factory.mktemp("nets") / "flux_lora.safetensors")


def fcfg(model: str, outdir: Path, prompts: list[str], flux: FluxOptions | None = None, **kw) -> FluxGenerationConfig:
    values = dict(model=model, outdir=str(outdir), prompts=[parse_prompt_line(p) for p in prompts], width=SIZE,
                  height=SIZE, steps=STEPS, scale=3.5, seed=7, sampler="", device="cpu")
    values.update(kw)
    return FluxGenerationConfig(GenerationConfig(**values), flux or FluxOptions(t5xxl_max_token_length=16))


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_cli_writes_pngs_with_metadata(tmp_path, tiny_flux_single):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {red|green|blue} circle --l 2.5\na square --d 42\n")
    out = tmp_path / "out"
    r = run_script("flux_gen_img.py", "--pretrained_model_name_or_path", tiny_flux_single, "--outdir", str(out),
                   "--from_file", str(prompts), "--images_per_prompt", "2", "--batch_size", "2", "--W", "64",
                   "--H", "64", "--steps", "2", "--guidance_scale", "4", "--seed", "3", "--device", "cpu",
                   "--t5xxl_max_token_length", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    infos = [read_png_info(f) for f in files]
    assert [i.scale for i in infos] == [2.5, 2.5, 4, 4]
    assert infos[2].seed == 42 and len({i.seed for i in infos}) == 4
    assert all(i.steps == 2 and (i.width, i.height) == (64, 64) and "{" not in i.prompt for i in infos)
    assert all(f.stem.endswith(f"_{i.seed}") for f, i in zip(files, infos))
    arr = pixels(files)
    assert max_diff(arr[0], arr[1]) > 0  # different seeds, different images
    # progress with ETA: one bar over the run's images, one over each batch's denoising steps
    assert "images: 100%" in r.stderr and "4/4 [" in r.stderr, r.stderr[-2000:]
    assert "batch 2/2 steps" in r.stderr, r.stderr[-2000:]


def test_lora_multiplier_zero_is_base_one_changes(tmp_path, tiny_flux_single, flux_lora):
    def gen(name, prompts=("a red circle",), **kw):
        return pixels(run_flux_generation(fcfg(tiny_flux_single, tmp_path / name, list(prompts), **kw)))[0]

    base = gen("base")
    zero = gen("zero", networks=[NetworkSpec("networks.lora_flux", flux_lora, 0.0)])
    one = gen("one", networks=[NetworkSpec("networks.lora_flux", flux_lora, 1.0)])
    am = gen("am", prompts=["a red circle --am 0"], networks=[NetworkSpec("networks.lora_flux", flux_lora, 1.0)])
    merged = gen("merged", networks=[NetworkSpec("networks.lora_flux", flux_lora, 1.0)], network_merge=True)
    assert max_diff(base, zero) == 0 and max_diff(base, am) == 0
    assert max_diff(base, one) > 5
    assert max_diff(one, merged) <= 2


def _control_images(root: Path) -> list[str]:
    root.mkdir()
    yy, xx = np.mgrid[0:80, 0:96]
    stripes = ((xx // 8) % 2 * 255).astype(np.uint8)
    a, b = root / "a.png", root / "b.png"
    Image.fromarray(np.stack([stripes, 255 - stripes, stripes], -1)).save(a)
    Image.fromarray(np.full((80, 96, 3), 30, np.uint8)).save(b)
    return [str(a), str(b)]


def test_kontext_follows_control_image_and_takes_its_size(tmp_path, tiny_flux_single):
    a, b = _control_images(tmp_path / "ctrl")
    folder = str(Path(a).parent)

    def gen(name, control, **kw):
        options = FluxOptions(t5xxl_max_token_length=16, control_image=control, **kw)
        return run_flux_generation(fcfg(tiny_flux_single, tmp_path / name, ["make it blue"], options))

    both = gen("both", folder)  # one prompt line, every image of the folder
    assert len(both) == 2
    img_a, img_b = pixels(both)
    assert img_a.shape == (80, 96, 3)  # the control image's size, not --W/--H's 64x64
    only_a = pixels(gen("a", a))[0]
    assert max_diff(only_a, img_a) == 0  # image 0 of both runs: same seed, same control
    swapped = pixels(run_flux_generation(fcfg(tiny_flux_single, tmp_path / "b0", ["make it blue --cn " + b],
                                              FluxOptions(t5xxl_max_token_length=16))))[0]
    assert swapped.shape == (80, 96, 3)
    # same seed (image 0), other control image -> another output (a random tiny model reacts weakly, but it reacts)
    assert max_diff(only_a, swapped) > 0
    sized = gen("sized", a, size_given=True)
    assert pixels(sized)[0].shape == (SIZE, SIZE, 3)
    assert read_png_info(sized[0]).extra["guide_image"] == a


def _main(argv):
    from flux_gen_img import main

    return run_main(main, argv)


def test_gpu_only_flags_and_bad_input_are_clear_errors(tmp_path, capsys, tiny_flux_single):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU message")
    base = ["--ckpt", tiny_flux_single, "--outdir", str(tmp_path / "o"), "--prompt", "a cat", "--W", "64", "--H", "64"]
    assert _main(base + ["--blocks_to_swap", "4"]) == 1  # --fp8_base works on the CPU (tests/test_flux_lowvram.py)
    err = capsys.readouterr().err
    assert "--blocks_to_swap needs a CUDA GPU" in err and "Traceback" not in err
    assert _main(base[:-4] + ["--W", "72", "--H", "64"]) == 1
    assert "multiple of 16" in capsys.readouterr().err
    assert _main(base + ["--control_image", str(tmp_path / "missing")]) == 1
    assert "--control_image" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
