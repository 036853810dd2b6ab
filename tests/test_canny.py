"""tools/canny.py: same maps as grayscale + cv2.Canny, folder mode behaviour, sd-scripts single-image flags."""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from library.data.control_maps import RANDOM_THRESHOLD1, RANDOM_THRESHOLD2, canny_image, random_thresholds
from tools.canny import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image(seed: int, size: int = 64) -> np.ndarray:
    """A BGR image with shapes and noise, so edges exist at many gradient strengths."""
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, size - 16, 2)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(img, (int(x), int(y)), (int(x) + 15, int(y) + 12), color, -1)
    cv2.circle(img, (size // 2, size // 2), size // 5, (200, 30, 120), 2)
    return img


def reference(bgr: np.ndarray, t1: int, t2: int) -> np.ndarray:
    """sd-scripts' recipe, written out."""
    return cv2.Canny(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), t1, t2)


def read(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        cv2.imwrite(str(src / f"img{i}.png"), make_image(i))
    cv2.imwrite(str(src / "photo.jpg"), make_image(7))
    return src


def test_function_matches_cv2_on_grayscale():
    bgr = make_image(1)
    rgb = bgr[:, :, ::-1].copy()
    ref = reference(bgr, 100, 200)
    assert ref.any()
    for out in (canny_image(rgb, 100, 200), canny_image(bgr, 100, 200, channel_order="bgr")):
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        assert all(np.array_equal(out[:, :, c], ref) for c in range(3))
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert np.array_equal(canny_image(gray, 100, 200)[:, :, 0], ref)


def test_cli_folder_matches_cv2(folder, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/canny.py", "--input_dir", str(folder), "--output_dir", str(out),
           "--threshold1", "60", "--threshold2", "140"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(out)) == ["img0.png", "img1.png", "img2.png", "photo.png"]
    for name in ("img0", "img1", "img2", "photo"):
        src = cv2.imread(str(folder / (name + (".jpg" if name == "photo" else ".png"))))
        got = read(out / f"{name}.png")
        assert got.shape == (64, 64, 3)
        ref = reference(src, 60, 140)
        assert all(np.array_equal(got[:, :, c], ref) for c in range(3)), name
        assert set(np.unique(got)) <= {0, 255}


def test_default_thresholds_are_100_200(folder, tmp_path):
    out = tmp_path / "out"
    assert main(["--input_dir", str(folder), "--output_dir", str(out), "--no_progress"]) == 0
    src = cv2.imread(str(folder / "img0.png"))
    assert np.array_equal(read(out / "img0.png")[:, :, 0], reference(src, 100, 200))


def test_skips_existing_unless_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    marker = np.full((4, 4, 3), 7, np.uint8)
    cv2.imwrite(str(out / "img1.png"), marker)
    assert main(["--input_dir", str(folder), "--output_dir", str(out), "--no_progress"]) == 0
    assert "skipped 1" in capsys.readouterr().out
    assert np.array_equal(read(out / "img1.png"), marker)
    assert main(["--input_dir", str(folder), "--output_dir", str(out), "--no_progress", "--overwrite"]) == 0
    assert read(out / "img1.png").shape == (64, 64, 3)


def test_unreadable_file_reported(folder, tmp_path):
    (folder / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/canny.py", "--input_dir", str(folder), "--output_dir", str(out), "--no_progress"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "broken.png" in res.stderr and "Traceback" not in res.stderr
    assert "img0.png" in os.listdir(out) and "broken.png" not in os.listdir(out)  # the others are still made


def test_random_thresholds_deterministic_with_seed(folder, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, "3"), (b, "3"), (c, "4")):
        args = ["--input_dir", str(folder), "--output_dir", str(out), "--random_threshold", "--seed", seed,
                "--no_progress"]
        assert main(args) == 0
    names = sorted(os.listdir(a))
    assert all(np.array_equal(read(a / n), read(b / n)) for n in names)
    # each map is cv2.Canny with the thresholds drawn for (seed, name), within the documented ranges
    for name in ("img0.png", "photo.jpg"):
        t1, t2 = random_thresholds(3, name)
        assert RANDOM_THRESHOLD1[0] <= t1 <= RANDOM_THRESHOLD1[1] < RANDOM_THRESHOLD2[0] <= t2 <= RANDOM_THRESHOLD2[1]
        src = cv2.imread(str(folder / name))
        got = read(a / (os.path.splitext(name)[0] + ".png"))
        assert np.array_equal(got[:, :, 0], reference(src, t1, t2))
    draws = {random_thresholds(s, "img0.png") for s in range(20)}
    assert len(draws) > 10  # thresholds really vary


def test_sd_scripts_single_image_flags(tmp_path):
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), make_image(5))
    out = tmp_path / "sub" / "a_canny.png"
    cmd = [sys.executable, "tools/canny.py", "--input", str(src), "--output", str(out), "--thres1", "20",
           "--thres2", "90"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert np.array_equal(read(out)[:, :, 0], reference(cv2.imread(str(src)), 20, 90))
    # sd-scripts' defaults (32/224) when no threshold is given
    assert main(["--input", str(src), "--output", str(tmp_path / "d.png")]) == 0
    assert np.array_equal(read(tmp_path / "d.png")[:, :, 0], reference(cv2.imread(str(src)), 32, 224))


def test_bad_invocations(tmp_path):
    with pytest.raises(SystemExit):
        main(["--input_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main([])
    assert main(["--input", str(tmp_path / "missing.png"), "--output", str(tmp_path / "o.png")]) == 1
    assert main(["--input_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 1
