"""tools/synthesize.py and library/synth on the tiny SDXL: 64 px images, 2 denoising steps, LoRA training only in
one test (2 steps). Detectors are fake modules written into tmp_path; ultralytics is faked in sys.modules."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import run_script
from library.errors import UserError
from library.synth import filtering, pipeline, prompts, records
from library.synth.records import Box

DET = {"image_id": "a", "task": "detection",
       "prediction": {"detections": [{"bbox": [10, 10, 40, 40], "label": "dog"},
                                     {"bbox": [50, 20, 70, 60], "label": "dog"},
                                     {"bbox": [0, 0, 8, 6], "label": "cat"}]},
       "raw": {"meta": {"rel_path": "s0.png"}, "model": "det-v1"}, "score": 0.9}
CLS = {"image_id": "b", "task": "classification", "prediction": {"label": "traffic_light"},
       "raw": {"meta": {"rel_path": "s1.png"}}}


def make_inputs(tmp_path: Path, extra_lines: list[str] = ()) -> dict:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k, (w, h) in enumerate([(128, 96), (64, 64)]):
        im = Image.new("RGB", (w, h), (30, 60, 90))
        ImageDraw.Draw(im).rectangle([10, 10, 40, 40], fill=(250, 200, 0))
        im.save(imgs / f"s{k}.png")
    pred = tmp_path / "pred.jsonl"
    lines = [json.dumps(DET), json.dumps(CLS), *extra_lines]
    pred.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"images_root": str(imgs), "predictions": str(pred)}


def options(tmp_path: Path, model: str, inputs: dict, **kw) -> pipeline.SynthOptions:
    values = dict(predictions=inputs["predictions"], images_root=inputs["images_root"],
                  output_dir=str(tmp_path / "out"), model=model, num_samples=2, steps=2, resolution=64,
                  skip_training=True, device="cpu", seed=1)
    values.update(kw)
    return pipeline.SynthOptions(**values)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


# ------------------------------------------------------------------------------------------------ records


def test_records_report_bad_lines_with_numbers(tmp_path):
    bad = ["{not json", json.dumps({**CLS, "task": "segmentation"}),
           json.dumps({**CLS, "raw": {"meta": {"rel_path": "missing.png"}}}),
           json.dumps({**DET, "prediction": {"detections": [{"bbox": [1, 2, 3], "label": "x"}]}})]
    inputs = make_inputs(tmp_path, bad)
    recs, problems = records.read_predictions(inputs["predictions"], inputs["images_root"])
    assert [r.image_id for r in recs] == ["a", "b"]
    assert [p.line_no for p in problems] == [3, 4, 5, 6]
    assert "invalid JSON" in problems[0].message and "task" in problems[1].message
    assert "missing.png" in problems[2].message and "detections[0].bbox" in problems[3].message
    records.check_problems("p", recs, problems, "skip")  # skip: usable records remain
    with pytest.raises(records.RecordsError, match="line 3: invalid JSON.*line 5"):
        records.check_problems("p", recs, problems, "fail")
    # relative paths also resolve against meta.root, absolute paths need no root
    rec = records.parse_record({**CLS, "raw": {"meta": {"rel_path": "s1.png", "root": inputs["images_root"]}}},
                               1, None, str(tmp_path))
    assert rec.image_path.endswith("s1.png")


def test_cli_on_error_fail_is_one_message(tmp_path, tiny_sdxl_file):
    inputs = make_inputs(tmp_path, ["{oops"])
    args = ["--predictions", inputs["predictions"], "--images_root", inputs["images_root"], "--output_dir",
            str(tmp_path / "out"), "--pretrained_model_name_or_path", tiny_sdxl_file, "--num_samples", "1",
            "--steps", "2", "--resolution", "64", "--skip_training", "--device", "cpu"]
    r = run_script("tools/synthesize.py", *args, "--on_error", "fail")
    assert r.returncode == 1
    assert "line 3: invalid JSON" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "images" / "synthetic_0001.png").exists()


def test_box_scaling_and_output_size(tmp_path):
    from library.synth.conditioning import output_size

    assert output_size(128, 96, 64) == (64, 64)
    assert output_size(1024, 768, 1024) == (1184, 896)  # aspect kept, multiples of 32
    with pytest.raises(UserError, match="multiple of 32"):
        output_size(64, 64, 50)
    inputs = make_inputs(tmp_path)
    src = records.parse_record(DET, 1, inputs["images_root"], str(tmp_path))
    (box, *_) = records.scaled_boxes(src, (64, 32), (128, 96))
    assert box.as_list() == pytest.approx([5, 10 / 3, 20, 40 / 3])
    rec = records.synthetic_record(src, "synthetic_0001", "/o/images/synthetic_0001.png", "images/synthetic_0001.png",
                                   "/o", (64, 32), (128, 96), {"kept": True})
    assert rec["prediction"]["detections"][1] == {"bbox": [25.0, 6.67, 35.0, 20.0], "label": "dog"}
    assert rec["raw"]["meta"] == {"rel_path": "images/synthetic_0001.png", "abs_path": "/o/images/synthetic_0001.png",
                                  "root": "/o", "width": 64, "height": 32}
    assert rec["raw"]["model"] == "det-v1" and rec["score"] == 0.9 and rec["synthetic"] == {"kept": True}
    assert DET["prediction"]["detections"][1]["bbox"] == [50, 20, 70, 60]  # the input is not modified


# ------------------------------------------------------------------------------------------------ prompts


def test_prompts_from_annotations():
    assert prompts.describe_labels(["dog", "cat", "dog"]) == "2 dogs and a cat"
    assert prompts.describe_labels(["person", "person", "bus", "bus", "apple"]) == "2 people, 2 buses and an apple"
    assert prompts.describe_labels(["traffic_light"]) == "a traffic light"
    assert prompts.build_prompt("a photo with {labels}", ["dog", "cat", "dog"]) == "a photo with 2 dogs and a cat"
    assert prompts.build_prompt("{label}, {count} objects", ["butterfly", "butterfly"]) == "butterfly, 2 objects"
    assert prompts.pluralize("butterfly") == "butterflies" and prompts.pluralize("box") == "boxes"
    with pytest.raises(UserError, match="unknown placeholder"):
        prompts.build_prompt("a photo of {labelz}", ["dog"])


# ------------------------------------------------------------------------------------------------ end to end


def test_generate_records_conditions_then_rerun_makes_nothing_new(tmp_path, tiny_sdxl_file):
    inputs = make_inputs(tmp_path, ["{bad"])
    out = tmp_path / "out"
    args = ["--predictions", inputs["predictions"], "--images_root", inputs["images_root"], "--output_dir",
            str(out), "--pretrained_model_name_or_path", tiny_sdxl_file, "--num_samples", "3", "--steps", "2",
            "--resolution", "64", "--skip_training", "--device", "cpu", "--seed", "5"]
    r = run_script("tools/synthesize.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "line 3" in r.stderr  # the skipped line is reported
    names = [f"synthetic_{i:04d}" for i in (1, 2, 3)]
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{n}.png" for n in names]
    for n in names:
        canny = Image.open(out / "controlnet_conditions" / "canny" / f"{n}_canny.png")
        assert canny.size == Image.open(out / "images" / f"{n}.png").size
        assert set(np.unique(np.asarray(canny))) <= {0, 255}
    recs = read_jsonl(out / "predictions.jsonl")
    assert [r["image_id"] for r in recs] == names
    first, second, third = recs
    assert first["task"] == "detection" and first["score"] == 0.9 and first["raw"]["model"] == "det-v1"
    w, h = Image.open(out / "images" / "synthetic_0001.png").size
    assert (w, h) == (first["raw"]["meta"]["width"], first["raw"]["meta"]["height"])
    sx, sy = w / 128, h / 96
    assert first["prediction"]["detections"][0]["bbox"] == pytest.approx([10 * sx, 10 * sy, 40 * sx, 40 * sy], abs=0.01)
    assert first["raw"]["meta"]["rel_path"] == "images/synthetic_0001.png"
    assert Path(first["raw"]["meta"]["abs_path"]).is_file()
    syn = first["synthetic"]
    assert syn["source_image_id"] == "a" and syn["prompt"] == "a photo with 2 dogs and a cat" and syn["kept"]
    assert second["task"] == "classification" and second["prediction"]["label"] == "traffic_light"
    assert second["synthetic"]["prompt"] == "a photo with a traffic light"
    assert third["synthetic"]["source_image_id"] == "a" and third["synthetic"]["seed"] != syn["seed"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    records_before = (out / "predictions.jsonl").read_text()

    r = run_script("tools/synthesize.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "generated 0, reused 3" in r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")} == before
    assert (out / "predictions.jsonl").read_text() == records_before


FAKE_DETECTORS = '''
import json, os
RECORDS = json.loads(os.environ.get("FAKE_BOXES", "[]"))

def finds_all(image):
    """Reports every box of the planned records (scaled to the image), with the right labels."""
    return [dict(d, score=0.9) for d in RECORDS]

def finds_nothing(image):
    return [{"bbox": [0, 0, 1, 1], "label": "giraffe", "score": 0.99}]
'''


def test_filtering_with_fake_detectors(tmp_path, tiny_sdxl_file, monkeypatch):
    inputs = make_inputs(tmp_path)
    (tmp_path / "fake_dets.py").write_text(FAKE_DETECTORS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_dets", None)
    # source "a" (128x96) -> 64x64 output: boxes scale by (0.5, 2/3); traffic light for "b" anywhere
    monkeypatch.setenv("FAKE_BOXES", json.dumps(
        [{"bbox": [5, 6.67, 20, 26.67], "label": "dog"}, {"bbox": [25, 13.3, 35, 40], "label": "Dog"},
         {"bbox": [0, 0, 4, 4], "label": "cat"}, {"bbox": [1, 1, 9, 9], "label": "traffic light"}]))
    s = pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, filter_spec="fake_dets:finds_all", iou=0.5))
    out = tmp_path / "out"
    assert (s.kept, s.filtered) == (2, 0)
    kept = read_jsonl(out / "predictions.jsonl")
    assert kept[0]["synthetic"]["filter"] == {"kept": True, "matched": 3, "expected": 3, "detections": 4}

    s = pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, filter_spec="fake_dets:finds_nothing",
                             output_dir=str(tmp_path / "out2")))
    out2 = tmp_path / "out2"
    assert (s.kept, s.filtered) == (0, 2)
    assert read_jsonl(out2 / "predictions.jsonl") == []
    filtered = read_jsonl(out2 / "filtered.jsonl")
    assert [r["synthetic"]["kept"] for r in filtered] == [False, False]
    assert (out2 / "filtered" / "synthetic_0001.png").is_file()
    assert not (out2 / "images" / "synthetic_0001.png").exists()

    with pytest.raises(UserError, match="no 'nope'"):
        pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, filter_spec="fake_dets:nope"))


def test_iou_and_matching():
    assert filtering.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert filtering.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert filtering.iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    boxes = [Box(0, 0, 10, 10, "dog"), Box(0, 0, 10, 10, "dog")]
    one = [{"bbox": [0, 0, 10, 10], "label": "dog", "score": 1.0}]
    assert not filtering.match_boxes(boxes, ["dog", "dog"], one, 0.5).kept  # one detection cannot match two boxes
    assert filtering.match_boxes(boxes, ["dog", "dog"], one * 2, 0.5).kept
    shifted = [{"bbox": [5, 0, 15, 10], "label": "dog"}] * 2
    assert not filtering.match_boxes(boxes, ["dog", "dog"], shifted, 0.5).kept
    assert filtering.match_boxes(boxes, ["dog", "dog"], shifted, 0.3).kept
    assert not filtering.match_boxes(boxes, ["dog"] * 2, [dict(d, label="cat") for d in one * 2], 0.5).kept
    assert not filtering.match_boxes(boxes, ["dog"] * 2, [dict(d, score=0.1) for d in one * 2], 0.5, 0.5).kept
    assert filtering.match_boxes([], ["traffic_light"], [{"bbox": [0, 0, 1, 1], "label": "Traffic Light"}], 0.5).kept


def test_yolo_adapter_with_fake_ultralytics(monkeypatch):
    calls = {}

    class FakeBoxes:
        xyxy = torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 9.0, 9.0]])
        cls = torch.tensor([16.0, 2.0])
        conf = torch.tensor([0.8, 0.3])

    class FakeResult:
        names = {2: "car", 16: "dog"}
        boxes = FakeBoxes()

    class FakeYOLO:
        def __init__(self, weights):
            calls["weights"] = weights

        def __call__(self, image, **kw):
            calls["image"], calls["kw"] = image.size, kw
            return [FakeResult()]

    monkeypatch.setitem(sys.modules, "ultralytics", types.SimpleNamespace(YOLO=FakeYOLO))
    det = filtering.YoloDetector("w.pt")
    out = det(Image.new("RGB", (64, 48)))
    assert calls["weights"] == "w.pt" and calls["image"] == (64, 48) and calls["kw"] == {"verbose": False}
    assert out == [{"bbox": [1.0, 2.0, 30.0, 40.0], "label": "dog", "score": pytest.approx(0.8)},
                   {"bbox": [5.0, 5.0, 9.0, 9.0], "label": "car", "score": pytest.approx(0.3)}]
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # not installed
    with pytest.raises(UserError, match="optional package 'ultralytics'"):
        filtering.YoloDetector("w.pt")


def tiny_depth_model(folder: Path) -> str:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                    fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(cfg).save_pretrained(str(folder))
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(str(folder))
    return str(folder)


def test_depth_conditioning_with_tiny_dpt(tmp_path, tiny_sdxl_file):
    inputs = make_inputs(tmp_path)
    depth = tiny_depth_model(tmp_path / "dpt")
    pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, controlnet_types=["canny", "depth"], depth_model=depth,
                         num_samples=1))
    out = tmp_path / "out"
    d = Image.open(out / "controlnet_conditions" / "depth" / "synthetic_0001_depth.png")
    assert d.size == Image.open(out / "images" / "synthetic_0001.png").size
    arr = np.asarray(d)
    assert arr.max() == 255 and arr.min() == 0  # normalised
    assert read_jsonl(out / "predictions.jsonl")[0]["synthetic"]["conditions"]["depth"].endswith("_depth.png")


def test_trains_a_lora_then_generates_with_it(tmp_path, tiny_sdxl_file):
    inputs = make_inputs(tmp_path)
    s = pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, skip_training=False, train_steps=2, num_samples=1))
    lora = tmp_path / "out" / "lora" / "synth_lora.safetensors"
    assert s.lora_path == str(lora) and lora.is_file()
    assert "max_train_steps = 2" in (tmp_path / "out" / "lora" / "run.toml").read_text()
    assert sorted(p.name for p in (tmp_path / "out" / "lora" / "images").glob("*.txt")) == \
        ["source_00001.txt", "source_00002.txt"]
    rec = read_jsonl(tmp_path / "out" / "predictions.jsonl")[0]
    assert rec["synthetic"]["lora"] == str(lora)



def again_seed(run_seed: int) -> int:
    from library.sample.generation import derive_seed

    return derive_seed(run_seed, 0)


def test_rerun_with_other_seed_regenerates_and_lllite_follows_the_canny(tmp_path, tiny_sdxl_file):
    from library.models.tiny import build_tiny_sdxl
    from networks.control_net_lllite import create_network

    inputs = make_inputs(tmp_path)
    plain = dict(num_samples=1, controlnet_types=[])
    first = pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, seed=1, **plain))
    again = pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, seed=2, **plain))
    assert (first.generated, again.generated, again.reused) == (1, 1, 0)
    (rec,) = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert rec["synthetic"]["seed"] == again_seed(2)
    assert not (tmp_path / "out" / "controlnet_conditions" / "canny").exists()

    net = create_network(build_tiny_sdxl(0).unet, cond_emb_dim=8, network_dim=8)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in net.unet_modules:  # zero-initialised `up` would make LLLite a no-op
            module.up[0].weight.copy_(torch.randn(module.up[0].weight.shape, generator=gen))
    lllite = tmp_path / "lllite.safetensors"
    net.save_weights(str(lllite))
    pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, seed=2, lllite_path=str(lllite),
                         output_dir=str(tmp_path / "guided"), **plain))
    unguided = np.asarray(Image.open(tmp_path / "out" / "images" / "synthetic_0001.png"))
    guided = np.asarray(Image.open(tmp_path / "guided" / "images" / "synthetic_0001.png"))
    assert unguided.shape == guided.shape and not np.array_equal(unguided, guided)
    assert (tmp_path / "guided" / "controlnet_conditions" / "canny" / "synthetic_0001_canny.png").is_file()


def test_bad_options_fail_before_any_work(tmp_path):
    inputs = make_inputs(tmp_path)
    for bad, match in [(dict(num_samples=0), "--num_samples"), (dict(resolution=50), "multiple of 32"),
                       (dict(lora_path=str(tmp_path / "nope.safetensors"), skip_training=False), "--lora_path"),
                       (dict(filter_spec="no_colon"), "module:function"), (dict(iou=1.5), "--iou"),
                       (dict(controlnet_types=["depth"]), "needs --depth_model")]:
        with pytest.raises(UserError, match=match):
            pipeline.run(options(tmp_path, "unused.safetensors", inputs, **bad))
    assert not (tmp_path / "out").exists()
