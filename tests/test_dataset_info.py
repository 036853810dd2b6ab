"""tools/dataset_info.py: the model-free inspector, run as users run it (a subprocess from the repo root)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "dataset_info.py")


def run_tool(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def save(path, size, fmt=None, exif=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    kwargs = {"exif": exif} if exif is not None else {}
    Image.new("RGB", size, (10, 120, 200)).save(path, format=fmt, **kwargs)


@pytest.fixture
def dataset(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    save(train / "wide.png", (200, 64))
    save(train / "square.png", (96, 96))
    exif = Image.Exif()
    exif[0x0112] = 8  # stored landscape, shown portrait
    save(train / "rotated.jpg", (200, 64), fmt="JPEG", exif=exif.tobytes())
    (train / "wide.caption").write_text("wide photo, blue", encoding="utf-8")
    save(reg / "r1.png", (64, 64))
    save(reg / "r2.png", (128, 128))
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(
        f"""
[general]
resolution = 128
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
caption_prefix = "prefix not shown"

[[datasets]]
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{train.as_posix()}"
  class_tokens = "sks thing"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "{reg.as_posix()}"
  class_tokens = "thing"
  is_reg = true
""",
        encoding="utf-8",
    )
    return cfg


def test_json_report(dataset):
    proc = run_tool("--dataset_config", str(dataset), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (d,) = report["datasets"]
    assert d["resolution"] == [128, 128] and d["batch_size"] == 2 and d["enable_bucket"] is True
    assert [(s["is_reg"], s["num_repeats"], s["num_images"]) for s in d["subsets"]] == [(False, 10, 3), (True, 1, 2)]
    assert d["subsets"][0]["image_dir"] == str(dataset.parent / "train")
    images = {os.path.basename(i["path"]): i for i in d["images"]}
    assert images["wide.png"]["caption"] == "wide photo, blue"  # raw: no prefix
    assert images["square.png"]["caption"] == "sks thing"
    assert images["rotated.jpg"]["original_size"] == [64, 200]  # EXIF orientation 8 swaps w/h
    # candidates for 128 / 64..256 / step 64: (64,192) (64,256) (128,128) (192,64) (256,64)
    assert images["wide.png"]["bucket"] == [192, 64]
    assert images["rotated.jpg"]["bucket"] == [64, 192]
    assert images["square.png"]["bucket"] == [128, 128]
    assert images["r1.png"]["bucket"] == [128, 128] and images["r2.png"]["bucket"] == [128, 128]
    # counts are images, not repeats
    assert d["buckets"] == [
        {"resolution": [64, 192], "count": 1},
        {"resolution": [128, 128], "count": 3},
        {"resolution": [192, 64], "count": 1},
    ]


def test_readable_summary(dataset, tmp_path):
    proc = run_tool("--dataset_config", str(dataset), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "3 images x 10 repeats, training" in out and "2 images x 1 repeats, regularization" in out
    assert "128x128: 3" in out and "192x64: 1" in out and str(dataset.parent / "reg") in out


def test_bucketing_off_reports_training_resolution(tmp_path):
    save(tmp_path / "i" / "a.png", (300, 100))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[datasets]]\nresolution = [96, 64]\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "i").as_posix()}"\nclass_tokens = "x"\n')
    d = json.loads(run_tool("--dataset_config", str(cfg), "--json").stdout)["datasets"][0]
    assert d["enable_bucket"] is False and d["images"][0]["bucket"] == [96, 64]


@pytest.mark.parametrize(
    "body, needles",
    [
        ("[general]\nresolution = 128\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\nnum_repeat = 2\n",
         ["datasets[0].subsets[0]", "num_repeat", "num_repeats"]),
        ("[general]\nresolution = 128\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}/missing'\n",
         ["datasets[0].subsets[0]", "image_dir", "missing"]),
        ("[general]\nresolution = 'big'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\n",
         ["general", "resolution"]),
        ("[general\n", ["line 1"]),
    ],
)
def test_bad_config_exits_1_without_traceback(tmp_path, body, needles):
    d = tmp_path / "imgs"
    save(d / "a.png", (64, 64))
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body.format(d=d.as_posix()), encoding="utf-8")
    proc = run_tool("--dataset_config", str(cfg), "--json")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert str(cfg) in proc.stderr
    for needle in needles:
        assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unreadable_image_is_a_clean_error(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "broken.png").write_bytes(b"not a png")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{d.as_posix()}"\nclass_tokens = "x"\n')
    proc = run_tool("--dataset_config", str(cfg))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "broken.png" in proc.stderr


def test_main_in_process(dataset, capsys):
    sys.path.insert(0, REPO)
    from tools.dataset_info import main

    assert main(["--dataset_config", str(dataset), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["datasets"][0]["subsets"][1]["is_reg"] is True
