"""A dataset from the command line, without a dataset TOML (sd-scripts' most common form): `--train_data_dir` with
'<repeats>_<class tokens>' sub-folders, `--reg_data_dir`, `--in_json`, and the dataset flags as defaults for a TOML.
Driven through tools/dataset_info.py and sdxl_train_network.py as users run them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import BUCKETING, run_script, write_dataset_toml


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    """train/10_sks dog (3 images with captions), train/2_cat (2 without captions), train/notes (no prefix: skipped),
    reg/1_dog (2 images)."""
    from library.data.synthetic import make_shapes_dataset

    train, reg = tmp_path / "train", tmp_path / "reg"
    make_shapes_dataset(str(train / "10_sks dog"), 3, sizes=[(64, 64), (96, 64)], seed=0)
    make_shapes_dataset(str(train / "2_cat"), 2, sizes=[(64, 64)], seed=1)
    for txt in (train / "2_cat").glob("*.txt"):
        txt.unlink()  # no caption files: the class tokens are the captions
    (train / "notes").mkdir()
    make_shapes_dataset(str(reg / "1_dog"), 2, sizes=[(64, 64)], seed=2)
    return {"train": train, "reg": reg, "root": tmp_path}


def dataset_info(*args: str) -> dict:
    r = run_script("tools/dataset_info.py", *args, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_subfolders_become_subsets_with_repeats_and_class_tokens(folders):
    report = dataset_info("--train_data_dir", str(folders["train"]), "--reg_data_dir", str(folders["reg"]),
                          "--resolution", "64,64", "--caption_extension", ".txt")
    (d,) = report["datasets"]
    assert d["kind"] == "dreambooth" and d["resolution"] == [64, 64] and d["batch_size"] == 1
    subsets = [(Path(s["image_dir"]).name, s["num_repeats"], s["class_tokens"], s["is_reg"], s["num_images"])
               for s in d["subsets"]]
    assert subsets == [("10_sks dog", 10, "sks dog", False, 3), ("2_cat", 2, "cat", False, 2),
                       ("1_dog", 1, "dog", True, 2)]
    captions = {Path(i["path"]).parent.name: i["caption"] for i in d["images"]}
    assert captions["2_cat"] == "cat" and captions["10_sks dog"].startswith("a ")


def test_same_resolution_as_the_equivalent_toml(folders):
    """The flags and a TOML of the same folders resolve to the same datasets, images and buckets."""
    train = folders["train"]
    toml = write_dataset_toml(folders["root"] / "same.toml", {"resolution": [64, 64], "batch_size": 2, "subsets": [
        {"image_dir": (train / "10_sks dog").as_posix(), "num_repeats": 10, "class_tokens": "sks dog"},
        {"image_dir": (train / "2_cat").as_posix(), "num_repeats": 2, "class_tokens": "cat"}]},
        general={"caption_extension": ".txt", **BUCKETING})
    from_toml = dataset_info("--dataset_config", toml)
    from_flags = dataset_info("--train_data_dir", str(train), "--resolution", "64", "--caption_extention", ".txt",
                              "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                              "--bucket_reso_steps", "32", "--train_batch_size", "2")
    for report in (from_toml, from_flags):
        report["datasets"][0].pop("table")
    assert from_flags == from_toml


def test_flags_are_defaults_below_a_dataset_toml(folders):
    """--train_batch_size is the batch size of a [[datasets]] that sets none; a value in the TOML wins."""
    img = (folders["train"] / "10_sks dog").as_posix()
    toml = write_dataset_toml(folders["root"] / "d.toml", {"resolution": 64, "subsets": [{"image_dir": img}]},
                              {"resolution": 64, "batch_size": 1, "subsets": [{"image_dir": img}]})
    report = dataset_info("--dataset_config", toml, "--train_batch_size", "3", "--dataset_repeats", "4")
    assert [d["batch_size"] for d in report["datasets"]] == [3, 1]
    assert report["datasets"][0]["subsets"][0]["num_repeats"] == 4


def test_folder_rules_and_clear_errors(folders, caplog):
    from library.config.dataset_source import dataset_source_from_flags, parse_resolution
    from library.errors import ConfigError

    with caplog.at_level(logging.WARNING):
        source = dataset_source_from_flags({"train_data_dir": str(folders["train"])})
    assert [s["image_dir"].rsplit("/", 1)[-1] for s in source.table["datasets"][0]["subsets"]] == ["10_sks dog",
                                                                                                   "2_cat"]
    assert "notes" in caplog.text and "skipped" in caplog.text
    assert parse_resolution("1024,768") == [1024, 768] and parse_resolution("512") == 512
    with pytest.raises(ConfigError, match="--resolution"):
        parse_resolution("big")
    with pytest.raises(ConfigError, match="sub-folder"):
        dataset_source_from_flags({"train_data_dir": str(folders["train"] / "10_sks dog")})
    with pytest.raises(ConfigError, match="folder not found"):
        dataset_source_from_flags({"train_data_dir": str(folders["root"] / "nope")})
    r = run_script("tools/dataset_info.py", "--train_data_dir", str(folders["train"]))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--resolution" in r.stderr


def test_in_json_is_a_fine_tuning_dataset(folders):
    img_dir = folders["train"] / "10_sks dog"
    meta = {p.stem: {"caption": f"caption of {p.stem}"} for p in sorted(img_dir.glob("*.png"))}
    meta_file = folders["root"] / "meta.json"
    meta_file.write_text(json.dumps(meta))
    report = dataset_info("--train_data_dir", str(img_dir), "--in_json", str(meta_file), "--resolution", "64",
                          "--dataset_repeats", "3")
    (d,) = report["datasets"]
    assert d["kind"] == "finetuning" and d["subsets"][0]["num_repeats"] == 3
    assert sorted(i["caption"] for i in d["images"]) == sorted(v["caption"] for v in meta.values())


@pytest.mark.parametrize("with_reg", [False, True])
def test_train_data_dir_trains_through_the_script(tmp_path, tiny_sdxl_file, folders, with_reg):
    out = tmp_path / "out"
    reg = ["--reg_data_dir", str(folders["reg"])] if with_reg else []
    r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_sdxl_file,
                   "--train_data_dir", str(folders["train"]), *reg, "--resolution", "64",
                   "--caption_extension", ".txt", "--train_batch_size", "2", "--network_dim", "2",
                   "--network_train_unet_only", "--learning_rate", "1e-3", "--max_train_steps", "2", "--seed", "1",
                   "--output_dir", str(out), "--output_name", "lora", "--loss_log_file", str(tmp_path / "l.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "lora.safetensors").is_file()
    assert len((tmp_path / "l.jsonl").read_text().splitlines()) == 2
    assert "notes" in r.stderr  # the skipped folder is named once


def test_conditioning_data_dir_is_a_controlnet_dataset(tmp_path):
    """sdxl_train_control_net_lllite.py's command-line form: the images and their conditioning images."""
    from library.data.synthetic import make_shapes_dataset

    make_shapes_dataset(str(tmp_path / "img"), 2, seed=0, conditioning_dir=str(tmp_path / "cond"))
    report = dataset_info("--train_data_dir", str(tmp_path / "img"), "--conditioning_data_dir", str(tmp_path / "cond"),
                          "--caption_extension", ".txt", "--resolution", "64")
    (d,) = report["datasets"]
    assert d["kind"] == "controlnet" and d["subsets"][0]["num_images"] == 2
    assert all(Path(i["conditioning_path"]).parent.name == "cond" for i in d["images"])
