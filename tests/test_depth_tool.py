"""tools/depth.py with the tiny DPT of the synthesis tests: maps per image, skips, unreadable inputs, bad model."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from conftest import run_script
from library.data.control_maps import DepthEstimator
from test_synthesize import tiny_depth_model


def test_depth_folder(tmp_path):
    model = tiny_depth_model(tmp_path / "dpt")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k, size in enumerate([(48, 32), (40, 40)]):
        im = Image.new("RGB", size, (20, 40, 60))
        ImageDraw.Draw(im).rectangle([5, 5, 20, 20], fill=(250, 250, 0))
        im.save(imgs / f"p{k}.jpg" if k else imgs / f"p{k}.png")
    (imgs / "broken.png").write_bytes(b"not an image")
    (imgs / "notes.txt").write_text("ignored")
    out = tmp_path / "depth"
    r = run_script("tools/depth.py", "--input_dir", str(imgs), "--output_dir", str(out), "--model", model,
                   "--no_progress")
    assert r.returncode == 1 and "broken.png: cannot read image" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["p0.png", "p1.png"]
    d0 = Image.open(out / "p0.png")
    assert d0.size == (48, 32)
    arr = np.asarray(d0)
    assert arr.max() == 255 and arr.min() == 0  # normalised per image
    # the same maps as the synthesis pipeline's estimator
    same = np.asarray(DepthEstimator(model)(Image.open(imgs / "p0.png").convert("RGB")))
    assert np.abs(arr.astype(int) - same.astype(int)).max() <= 1
    before = (out / "p0.png").stat().st_mtime_ns
    (imgs / "broken.png").unlink()
    r = run_script("tools/depth.py", "--input_dir", str(imgs), "--output_dir", str(out), "--model", model,
                   "--no_progress")
    assert r.returncode == 0 and "wrote 0, skipped 2" in r.stdout
    assert (out / "p0.png").stat().st_mtime_ns == before

    r = run_script("tools/depth.py", "--input_dir", str(imgs), "--output_dir", str(out), "--model",
                   str(tmp_path / "nope"))
    assert r.returncode == 1 and f"--model '{tmp_path / 'nope'}': no such folder" in r.stderr
    assert "Traceback" not in r.stderr
