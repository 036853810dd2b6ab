"""Folders -> report: prompts from PNG chunks or a file, skipped metrics, baseline gain, and the CLI's JSON/errors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from library.eval.metrics import load_clip_model, load_dino_model, strip_token
from library.eval.report import (
    EvalError,
    compare_reports,
    evaluate_folders,
    evaluate_with_baseline,
    write_report_json,
)
from library.eval.tiny_models import save_tiny_clip, save_tiny_dino
from library.prompts.png_metadata import GenerationInfo, save_png_with_info
from tools.evaluate import main

from conftest import run_script

PROMPTS = ["a photo of sksToy toy on a beach", "sksToy, a toy in the snow", "a sksToy toy in a red box"]


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval_models")
    return {"dino": str(save_tiny_dino(root / "dino", seed=0)), "clip": str(save_tiny_clip(root / "clip", seed=0))}


@pytest.fixture(scope="session")
def loaded(eval_models) -> dict:
    return {"dino": load_dino_model(eval_models["dino"]), "clip": load_clip_model(eval_models["clip"])}


def toy(kind: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    img = Image.new("RGB", size, [(255, 255, 255), (30, 30, 30), (120, 200, 120)][kind % 3])
    draw = ImageDraw.Draw(img)
    box = (6 + 4 * kind, 5, size[0] - 6, size[1] - 5 - 2 * kind)
    (draw.ellipse if kind % 2 == 0 else draw.rectangle)(box, fill=[(220, 30, 30), (30, 60, 230), (240, 200, 0)][kind % 3])
    return img


def noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_generated(folder: Path, images: list[Image.Image], prompts: list[str] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = folder / f"{i:03d}.png"
        if prompts is None:
            img.save(path)
        else:
            save_png_with_info(img, path, GenerationInfo(prompt=prompts[i], seed=i, steps=4, scale=7.0))
    return folder


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    real = tmp_path / "real"
    real.mkdir()
    toy(0).save(real / "IMG_0001.heic")  # a phone photo, as users drop them in
    toy(0).save(real / "IMG_0002.jpg", quality=100)
    gen = write_generated(tmp_path / "gen", [toy(0), toy(1), noise(0)], PROMPTS)
    return {"real": real, "gen": gen, "root": tmp_path}


def hand_clip_t(clip_dir: str, images: list[Image.Image], prompts: list[str]) -> float:
    """CLIP-T computed directly with transformers, independent of the embedder classes."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        img = model.get_image_features(**processor(images=images, return_tensors="pt"))
        txt = model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt"))
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return float(torch.nn.functional.cosine_similarity(img, txt, dim=1).mean())


# ------------------------------------------------------------------------------------------- report


def test_copies_of_the_real_image_score_one(tmp_path, loaded):
    real = tmp_path / "real"
    real.mkdir()
    toy(2).save(real / "a.png")
    gen = write_generated(tmp_path / "gen", [toy(2)] * 3, None)
    report = evaluate_folders(gen, real, dino_model=loaded["dino"], clip_model=loaded["clip"])
    assert report["dino"] == pytest.approx(1.0, abs=1e-5)
    assert report["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert report["clip_t"] is None  # plain PNGs, no prompts: skipped, not an error
    assert (report["num_generated"], report["num_real"]) == (3, 1)
    noisy = evaluate_folders(write_generated(tmp_path / "noise", [noise(1), noise(2)], None), real,
                             dino_model=loaded["dino"], clip_model=loaded["clip"])
    assert noisy["dino"] < report["dino"] - 1e-4 and noisy["clip_i"] < report["clip_i"] - 1e-4


def test_prompts_from_png_chunks_with_rare_token_stripped(folders, eval_models, loaded):
    report = evaluate_folders(folders["gen"], folders["real"], dino_model=loaded["dino"],
                              clip_model=eval_models["clip"], rare_token="sksToy")  # a path loads too
    assert report["num_prompts"] == 3
    rows = report["images"]
    assert [r["file"] for r in rows] == ["000.png", "001.png", "002.png"]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["clip_t_prompt"] for r in rows] == ["a photo of toy on a beach", "a toy in the snow",
                                                  "a toy in a red box"]
    assert all("sksToy" not in r["clip_t_prompt"] for r in rows)
    images = [toy(0), toy(1), noise(0)]
    stripped = [strip_token(p, "sksToy") for p in PROMPTS]
    assert report["clip_t"] == pytest.approx(hand_clip_t(eval_models["clip"], images, stripped), abs=1e-5)
    assert report["clip_t"] != pytest.approx(hand_clip_t(eval_models["clip"], images, PROMPTS), abs=1e-6)
    assert np.mean([r["dino"] for r in rows]) == pytest.approx(report["dino"])
    assert {"dino", "clip_i", "clip_t"} <= set(rows[0])


def test_prompts_file_overrides_and_must_match_count(folders, loaded, eval_models):
    prompts_file = folders["root"] / "prompts.txt"
    other = ["a toy", "a toy on grass", "a blue toy"]
    prompts_file.write_text("\n".join(other) + "\n\n", encoding="utf-8")
    report = evaluate_folders(folders["gen"], folders["real"], clip_model=loaded["clip"], prompts=str(prompts_file))
    assert [r["prompt"] for r in report["images"]] == other
    assert report["clip_t"] == pytest.approx(hand_clip_t(eval_models["clip"], [toy(0), toy(1), noise(0)], other),
                                             abs=1e-5)
    prompts_file.write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(EvalError, match=r"--prompts: .* has 2 prompts but the generated folder has 3 images"):
        evaluate_folders(folders["gen"], folders["real"], clip_model=loaded["clip"], prompts=str(prompts_file))


def test_some_images_without_prompt_is_an_error(folders, loaded):
    noise(5).save(folders["gen"] / "999.png")  # no chunks
    with pytest.raises(EvalError, match="1 of 4 images have no 'prompt' chunk.*999.png"):
        evaluate_folders(folders["gen"], folders["real"], clip_model=loaded["clip"])


def test_missing_models_skip_metrics_with_one_log_line(folders, caplog):
    with caplog.at_level(logging.INFO, logger="library.eval.report"):
        report = evaluate_folders(folders["gen"], folders["real"])
    assert report["dino"] is None and report["clip_i"] is None and report["clip_t"] is None
    assert (report["num_generated"], report["num_real"]) == (3, 2)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("DINO skipped: no --eval_dino_model") == 1
    assert sum("skipped: no --eval_clip_model" in m for m in messages) == 1


def test_baseline_gain(folders, loaded):
    lora = write_generated(folders["root"] / "lora", [toy(0)] * 3, PROMPTS)  # the subject, as a LoRA would draw it
    base = write_generated(folders["root"] / "base", [noise(7), noise(8), noise(9)], PROMPTS)
    report = evaluate_with_baseline(lora, base, folders["real"], dino_model=loaded["dino"],
                                    clip_model=loaded["clip"], rare_token="sksToy")
    lora_only = evaluate_folders(lora, folders["real"], dino_model=loaded["dino"],
                                 clip_model=loaded["clip"], rare_token="sksToy")
    base_only = evaluate_folders(base, folders["real"], dino_model=loaded["dino"], clip_model=loaded["clip"],
                                 rare_token="sksToy")
    for name in ("dino", "clip_i", "clip_t"):
        assert report[name] == pytest.approx(lora_only[name])
        assert report["baseline"][name] == pytest.approx(base_only[name])
        assert report["gain"][name] == pytest.approx(lora_only[name] - base_only[name])
    # copies of the subject against noise: both image metrics must credit the LoRA
    assert report["gain"]["dino"] > 0 and report["gain"]["clip_i"] > 0


def test_compare_reports_handles_skipped_metrics():
    gains = compare_reports({"dino": 0.8, "clip_i": 0.9, "clip_t": None}, {"dino": 0.5, "clip_i": 0.95, "clip_t": 0.3})
    assert gains == {"dino": pytest.approx(0.3), "clip_i": pytest.approx(-0.05), "clip_t": None}


def test_write_report_json_is_atomic_and_valid(tmp_path):
    path = write_report_json({"dino": float("nan"), "clip_i": 0.5, "images": []}, tmp_path / "out" / "eval.json")
    assert json.loads(path.read_text()) == {"dino": None, "clip_i": 0.5, "images": []}
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]


def test_bad_folders_are_clear_errors(tmp_path, folders):
    with pytest.raises(EvalError, match="--real_dir: folder .* does not exist"):
        evaluate_folders(folders["gen"], tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="--generated_dir: folder .* holds no images"):
        evaluate_folders(tmp_path / "empty", folders["real"])


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_json_report(folders, eval_models, capsys):
    out = folders["root"] / "reports" / "eval.json"
    rc = main(["--generated_dir", str(folders["gen"]), "--real_dir", str(folders["real"]),
               "--eval_dino_model", eval_models["dino"], "--eval_clip_model", eval_models["clip"],
               "--rare_token", "sksToy", "--output", str(out), "--device", "cpu"])
    assert rc == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert (report["num_generated"], report["num_real"], report["num_prompts"]) == (3, 2, 3)
    for name in ("dino", "clip_i", "clip_t"):
        assert isinstance(report[name], float) and -1.0 <= report[name] <= 1.0
    assert len(report["images"]) == 3 and report["rare_token"] == "sksToy"
    printed = capsys.readouterr().out
    assert "DINO" in printed and "CLIP-T" in printed and str(out) in printed


def test_cli_skips_metric_without_model(folders, eval_models, tmp_path):
    out = tmp_path / "eval.json"
    rc = main(["--generated_dir", str(folders["gen"]), "--real_dir", str(folders["real"]),
               "--eval_dino_model", eval_models["dino"], "--output", str(out), "--quiet"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["dino"] is not None and report["clip_i"] is None and report["clip_t"] is None


def test_cli_errors_cleanly(folders, tmp_path, capsys):
    rc = main(["--generated_dir", str(tmp_path / "missing"), "--real_dir", str(folders["real"])])
    err = capsys.readouterr().err
    assert rc == 1 and "--generated_dir" in err and "missing" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    rc = main(["--generated_dir", str(folders["gen"]), "--real_dir", str(folders["real"]),
               "--eval_clip_model", str(tmp_path / "no_clip")])
    err = capsys.readouterr().err
    assert rc == 1 and "--eval_clip_model" in err and "no_clip" in err and len(err.strip().splitlines()) == 1


def test_cli_runs_as_a_script_from_the_repo_root(tmp_path):
    result = run_script("tools/evaluate.py", "--generated_dir", str(tmp_path / "g"), "--real_dir", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "--generated_dir" in result.stderr
