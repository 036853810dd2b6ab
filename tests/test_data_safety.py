"""Datasets that cannot reach outside themselves or stop a run for a missing caption: metadata image paths that
climb out of the dataset folder are refused, absolute ones are read but their caches stay inside the folder the user
named, and images without a caption train with an empty one after one counted warning (as sd-scripts)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script, write_dataset_toml, write_toml
from PIL import Image

from library.cache.latents import EXTERNAL_CACHE_DIR, LatentCache, latent_cache_path
from library.config.dataset_schema import load_dataset_config
from library.data.dataset import TrainDataset
from library.data.sources import climbs_out, collect_records
from library.errors import ConfigError


def png(path: Path, size=(64, 64), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def finetune_config(tmp_path: Path, image_dir: Path, metadata: Path) -> str:
    return write_dataset_toml(tmp_path / "dataset.toml", {"resolution": 64, "batch_size": 1, "subsets": [
        {"image_dir": str(image_dir), "metadata_file": str(metadata)}]})


def records_of(cfg: str):
    group = load_dataset_config(cfg)
    return group, [collect_records(d, group.source) for d in group.datasets]


def fake_encoder(images: torch.Tensor) -> torch.Tensor:
    pooled = F.avg_pool2d(images, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


# ---- path containment -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, out", [("../../etc/x.png", True), ("a/../../x.png", True), ("..\\x.png", True),
                                      ("a/../x.png", False), ("./a/b.png", False), ("x", False)])
def test_climbs_out(key, out):
    assert climbs_out(key) is out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_relative_key_leaving_the_dataset_is_refused_with_file_record_and_path(tmp_path, fmt):
    data = tmp_path / "data"
    png(data / "a.png")
    secret = png(tmp_path / "outside" / "secret.png")  # exists: refused for where it is, not for being missing
    key = os.path.relpath(secret, data)  # ../outside/secret.png
    meta = data / f"meta.{fmt}"
    if fmt == "jsonl":
        meta.write_text(json.dumps({"file_name": "a.png", "text": "ok"}) + "\n"
                        + json.dumps({"file_name": key, "text": "x"}) + "\n")
        where = "line 2"
    elif fmt == "json":
        meta.write_text(json.dumps({"a.png": {"caption": "ok"}, key: {"caption": "x"}}))
        where = f"entry '{key}'"
    else:
        meta.write_text(f"file_name,text\na.png,ok\n{key},x\n")
        where = "line 3"
    cfg = finetune_config(tmp_path, data, meta)
    with pytest.raises(ConfigError) as e:
        records_of(cfg)
    msg = str(e.value)
    assert cfg in msg and "datasets[0].subsets[0]" in msg and str(meta) in msg and where in msg and key in msg
    assert "leaves the dataset folder" in msg


def test_refusal_reaches_the_user_as_one_line_from_the_inspector(tmp_path):
    data = tmp_path / "data"
    png(data / "a.png")
    (data / "meta.jsonl").write_text(json.dumps({"file_name": "../../../../etc/hostname", "text": "x"}) + "\n")
    cfg = finetune_config(tmp_path, data, data / "meta.jsonl")
    r = run_script("tools/dataset_info.py", "--dataset_config", cfg)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "leaves the dataset folder" in r.stderr and "../../../../etc/hostname" in r.stderr


def test_absolute_path_outside_is_read_but_its_cache_stays_in_the_dataset(tmp_path):
    data = tmp_path / "data"
    inside = png(data / "in.png", seed=1)
    outside = png(tmp_path / "elsewhere" / "out.png", seed=2)
    linked_dir = tmp_path / "linked"
    png(linked_dir / "via_link.png", seed=3)
    os.symlink(linked_dir, data / "link")  # a relative key through a symlink that leads out
    (data / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"file_name": "in.png", "text": "i"}, {"file_name": str(outside), "text": "o"},
        {"file_name": "link/via_link.png", "text": "l"}]))
    cfg = finetune_config(tmp_path, data, data / "meta.jsonl")
    group, records = records_of(cfg)
    ds = TrainDataset(group.datasets[0], records[0], seed=0)
    assert {os.path.basename(it.record.path) for it in ds.items} == {"in.png", "out.png", "via_link.png"}
    cache = LatentCache("fake-vae", "disk")
    assert cache.ensure(ds, fake_encoder, 2, progress=False) == 3
    paths = {os.path.basename(it.record.path): latent_cache_path(it) for it in ds.items}
    assert os.path.dirname(paths["in.png"]) == str(data)  # beside the image, as sd-scripts
    for name in ("out.png", "via_link.png"):
        assert os.path.dirname(paths[name]) == str(data / EXTERNAL_CACHE_DIR)
        assert os.path.isfile(paths[name])
    assert sorted(os.listdir(outside.parent)) == ["out.png"]  # nothing written beside the outside image
    assert sorted(os.listdir(linked_dir)) == ["via_link.png"]
    assert LatentCache("fake-vae", "disk").ensure(ds, fake_encoder, 2, progress=False) == 0  # found again
    assert inside.exists()


# ---- captions ---------------------------------------------------------------------------------------------------

def test_missing_and_empty_captions_train_empty_with_one_counted_warning(tmp_path, caplog):
    img = tmp_path / "img"
    for name in ("a", "b", "c", "d"):
        png(img / f"{name}.png")
    (img / "a.txt").write_text("a caption", encoding="utf-8")
    (img / "b.txt").write_text("", encoding="utf-8")
    (img / "c.txt").write_text("\n\n", encoding="utf-8")
    cfg = write_toml(tmp_path / "d.toml", f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{img}'
""")
    with caplog.at_level("WARNING"):
        _, records = records_of(cfg)
    assert [(os.path.basename(r.path), r.caption) for r in records[0][0]] == [
        ("a.png", "a caption"), ("b.png", ""), ("c.png", ""), ("d.png", "")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    empty = next(w for w in warnings if "are empty" in w)
    assert "2 caption file(s)" in empty and "b.png" in empty and "c.png" in empty
    missing = next(w for w in warnings if "no caption file" in w)
    assert "1 image(s)" in missing and "d.png" in missing and "class_tokens" in missing


def test_missing_caption_uses_class_tokens_without_warning(tmp_path, caplog):
    img = tmp_path / "img"
    png(img / "a.png")
    cfg = write_toml(tmp_path / "d.toml", f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                         f"image_dir = '{img}'\nclass_tokens = 'sks dog'\n")
    with caplog.at_level("WARNING"):
        _, records = records_of(cfg)
    assert records[0][0][0].caption == "sks dog" and not caplog.records


def test_metadata_records_without_caption_are_counted(tmp_path, caplog):
    data = tmp_path / "data"
    png(data / "a.png")
    png(data / "b.png")
    (data / "meta.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ""}) + "\n"
                                     + json.dumps({"file_name": "b.png", "text": "b"}) + "\n")
    with caplog.at_level("WARNING"):
        _, records = records_of(finetune_config(tmp_path, data, data / "meta.jsonl"))
    assert [r.caption for r in records[0][0]] == ["", "b"]
    assert "1 record(s)" in caplog.text and "a.png" in caplog.text
