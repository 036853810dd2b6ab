"""tools/captions_from_png.py and tools/write_dataset_config.py, run as users run them (subprocesses)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image, PngImagePlugin

try:
    import tomllib
except ImportError:  # Python 3.10
    import toml as tomllib  # type: ignore[no-redef]

from library.prompts.png_metadata import GenerationInfo, save_png_with_info

REPO = Path(__file__).resolve().parent.parent


def run_tool(name: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _image() -> Image.Image:
    return Image.new("RGB", (32, 32), (200, 100, 50))


def _make_pngs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_png_with_info(_image(), folder / "ours.png", GenerationInfo(prompt="a red cat, 日本語", seed=1))
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a blue dog\nNegative prompt: bad\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 3")
    _image().save(folder / "a1111.png", pnginfo=meta)
    _image().save(folder / "plain.png")
    (folder / "kept.txt").write_text("my own caption\n", encoding="utf-8")
    save_png_with_info(_image(), folder / "kept.png", GenerationInfo(prompt="generated caption"))


def test_captions_from_png_writes_skips_and_reports(tmp_path):
    images = tmp_path / "images"
    _make_pngs(images)
    result = run_tool("captions_from_png.py", "--image_dir", str(images), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (images / "ours.txt").read_text(encoding="utf-8") == "a red cat, 日本語\n"
    assert (images / "a1111.txt").read_text(encoding="utf-8") == "a blue dog\n"  # prompt only, not the negative
    assert (images / "kept.txt").read_text(encoding="utf-8") == "my own caption\n"  # existing one kept
    assert not (images / "plain.txt").exists()
    assert "plain.png" in result.stderr and "wrote 2" in result.stdout

    strict = run_tool("captions_from_png.py", "--image_dir", str(images), "--strict")
    assert strict.returncode == 1 and "plain.png" in strict.stderr

    over = run_tool(
        "captions_from_png.py", "--image_dir", str(images), "--overwrite", "--caption_extension", "caption"
    )
    assert over.returncode == 0, over.stderr
    assert (images / "kept.caption").read_text(encoding="utf-8") == "generated caption\n"
    over_txt = run_tool("captions_from_png.py", "--image_dir", str(images), "--overwrite")
    assert over_txt.returncode == 0
    assert (images / "kept.txt").read_text(encoding="utf-8") == "generated caption\n"


def test_captions_from_png_bad_folder_is_one_message(tmp_path):
    result = run_tool("captions_from_png.py", "--image_dir", str(tmp_path / "absent"))
    assert result.returncode == 2
    assert "absent" in result.stderr and "Traceback" not in result.stderr


def test_captions_from_png_main_in_process(tmp_path):
    from tools.captions_from_png import main

    images = tmp_path / "imgs"
    _make_pngs(images)
    assert main(["--image_dir", str(images), "--strict"]) == 1
    assert (images / "ours.txt").exists()


def test_write_dataset_config_for_lllite(tmp_path):
    images, cond = tmp_path / "img", tmp_path / "cond dir"
    images.mkdir()
    cond.mkdir()
    output = tmp_path / "configs" / "dataset.toml"
    result = run_tool(
        "write_dataset_config.py",
        "--image_dir", str(images),
        "--conditioning_data_dir", str(cond),
        "--caption_extension", "txt",
        "--resolution", "1024,768",
        "--batch_size", "2",
        "--num_repeats", "3",
        "--enable_bucket",
        "--max_bucket_reso", "2048",
        "--output", str(output),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = tomllib.loads(output.read_text(encoding="utf-8"))
    assert config["general"] == {"enable_bucket": True, "caption_extension": ".txt"}
    (dataset,) = config["datasets"]
    assert dataset["resolution"] == [1024, 768] and dataset["batch_size"] == 2 and dataset["max_bucket_reso"] == 2048
    (subset,) = dataset["subsets"]
    assert Path(subset["image_dir"]) == images.resolve()
    assert Path(subset["conditioning_data_dir"]) == cond.resolve()
    assert subset["num_repeats"] == 3


def test_write_dataset_config_defaults(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    output = tmp_path / "d.toml"
    result = run_tool("write_dataset_config.py", "--image_dir", str(images), "--output", str(output))
    assert result.returncode == 0, result.stderr
    config = tomllib.loads(output.read_text(encoding="utf-8"))
    assert config["general"] == {"enable_bucket": False, "caption_extension": ".txt"}
    assert config["datasets"][0]["resolution"] == 1024 and config["datasets"][0]["batch_size"] == 1
    assert config["datasets"][0]["subsets"][0]["num_repeats"] == 1
    assert "conditioning_data_dir" not in config["datasets"][0]["subsets"][0]


def test_write_dataset_config_rejects_bad_input(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    output = tmp_path / "d.toml"
    cases = [
        (["--image_dir", str(tmp_path / "absent")], "absent"),
        (["--image_dir", str(images), "--conditioning_data_dir", str(tmp_path / "nocond")], "nocond"),
        (["--image_dir", str(images), "--resolution", "big"], "--resolution"),
        (["--image_dir", str(images), "--batch_size", "0"], "--batch_size"),
    ]
    for args, fragment in cases:
        result = run_tool("write_dataset_config.py", *args, "--output", str(output))
        assert result.returncode == 2, args
        assert fragment in result.stderr and "Traceback" not in result.stderr
        assert not output.exists()
