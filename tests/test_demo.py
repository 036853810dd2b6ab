"""The README's demo command, shortened: tiny model + generated dataset -> LoRA -> images, end to end, plus what it
shows a newcomer (loss curve, with/without-LoRA difference, the summary that explains the noise images)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    r = subprocess.run([sys.executable, "-m", "library.demo", "--output_dir", str(out), "--steps", "4",
                        "--num_images", "4", "--gen_steps", "2", "--images_per_prompt", "2"],
                       check=False, cwd=str(REPO), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_demo_runs_end_to_end(demo):
    from library.prompts.png_metadata import read_png_info

    out, r = demo
    assert "demo finished" in r.stdout
    assert (out / "lora" / "demo_lora.safetensors").is_file()
    assert list((out / "lora" / "sample").glob("*.png"))
    for name in ("base", "with_lora"):
        pngs = list((out / "generated" / name).glob("*.png"))
        assert len(pngs) == 2
        assert read_png_info(pngs[0]).prompt.startswith("a ")
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_demo_draws_the_loss_curve_from_the_logged_losses(demo):
    out, r = demo
    steps = [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # this run's steps only
    with Image.open(out / "loss_curve.png") as img:
        img.verify()
    with Image.open(out / "loss_curve.png") as img:
        assert img.size[0] >= 200 and img.size[1] >= 100
        assert np.asarray(img.convert("RGB")).std() > 0  # something is drawn
    m = re.search(r"loss: ([0-9.]+) -> ([0-9.]+) over 4 steps", r.stdout)
    assert m, r.stdout[-2000:]


def test_demo_shows_what_the_lora_changes_and_why_images_are_noise(demo):
    out, r = demo
    with Image.open(out / "lora_difference.png") as img:
        img.verify()
    with Image.open(out / "lora_difference.png") as img:
        w, h = img.size
    with Image.open(next((out / "generated" / "base").glob("*.png"))) as one:
        cell_w, cell_h = one.size
    assert h >= 3 * cell_h and w >= 2 * cell_w  # rows: without, with, |difference|; one column per image pair
    m = re.search(r"the LoRA changed the images: mean abs pixel change ([0-9.]+)/255 over 2 image pair", r.stdout)
    assert m, r.stdout[-2000:]
    assert float(m.group(1)) > 0
    assert "randomly initialised" in r.stdout and "noise by design" in r.stdout


def test_demo_says_the_torchvision_fallback_once(demo):
    _, r = demo
    both = r.stdout + r.stderr
    notices = both.count("requires torchvision (not installed)") + both.count("torchvision is not installed")
    assert notices <= 1, both[-3000:]


def test_loss_summary_compares_means_of_the_first_and_last_steps():
    from library.demo_report import moving_average, summarise_losses

    points = [(i + 1, v) for i, v in enumerate([2.0, 1.0, 3.0, 1.0, 0.5, 0.5, 0.4, 0.6])]
    s = summarise_losses(points)
    assert (s.steps, s.window) == (8, 2)
    assert s.first == pytest.approx(1.5) and s.last == pytest.approx(0.5)
    assert moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_difference_sheet_pairs_images_by_index_and_seed(tmp_path):
    from library.demo_report import draw_difference_sheet, pair_images
    from library.errors import UserError

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    Image.new("RGB", (8, 8), (10, 10, 10)).save(a / "im_1_000000_5.png")
    Image.new("RGB", (8, 8), (10, 10, 10)).save(a / "im_1_000001_6.png")
    Image.new("RGB", (8, 8), (30, 10, 10)).save(b / "im_2_000000_5.png")  # other timestamp, same index and seed
    pairs = pair_images(a, b)
    assert [(p.name, q.name) for p, q in pairs] == [("im_1_000000_5.png", "im_2_000000_5.png")]
    change = draw_difference_sheet(pairs, tmp_path / "diff.png")
    assert (change.pairs, change.max_abs) == (1, 20)
    assert change.mean_abs == pytest.approx(20 / 3)
    with pytest.raises(UserError, match="no images with the same index and seed"):
        pair_images(a, tmp_path)


def test_torchvision_notice_passes_once_per_process_and_never_after_a_parent(monkeypatch):
    import logging

    from library import torchvision_notice

    logger = logging.getLogger("tests.torchvision_notice")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger.addHandler(Keep())
    logger.propagate = False
    monkeypatch.setattr(torchvision_notice, "SOURCE_LOGGER", logger.name)
    monkeypatch.delenv(torchvision_notice.SHOWN_ENV, raising=False)
    torchvision_notice.install()
    torchvision_notice.install()  # idempotent
    notice = "`{}ImageProcessor` requires torchvision (not installed); falling back to `{}ImageProcessorPil`"
    logger.warning(notice.format("CLIP", "CLIP"))
    logger.warning(notice.format("Siglip", "Siglip"))
    logger.warning("something else")
    assert seen == [notice.format("CLIP", "CLIP"), "something else"]

    logger.filters.clear()
    seen.clear()
    monkeypatch.setenv(torchvision_notice.SHOWN_ENV, "1")
    torchvision_notice.install()
    logger.warning(notice.format("CLIP", "CLIP"))
    logger.warning("still shown")
    assert seen == ["still shown"]
