"""The ss_* metadata of a saved LoRA: sd-scripts' full key set with its value formats, for a dataset TOML and for the
command-line dataset form; ss_tag_frequency counts each directory's caption tags; --training_comment and
--no_metadata."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import BUCKETING, run_script, write_dataset_toml, write_toml
from library.data.synthetic import make_shapes_dataset
from library.train.metadata import MINIMUM_KEYS, tag_frequency

pytestmark = pytest.mark.usefixtures("one_thread")

# sd-scripts' train_network.py: the keys every run writes (its `metadata = {...}`), then per save
COMMON_KEYS = {
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr",
    "ss_unet_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images", "ss_num_batches_per_epoch",
    "ss_num_epochs", "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps",
    "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_dropout", "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip",
    "ss_max_token_length", "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset",
    "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale", "ss_zero_terminal_snr",
    "ss_training_comment", "ss_sd_scripts_commit_hash", "ss_optimizer", "ss_max_grad_norm",
    "ss_caption_dropout_rate", "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate",
    "ss_face_crop_aug_range", "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms",
    "ss_ip_noise_gamma", "ss_debiased_estimation", "ss_noise_offset_random_strength",
    "ss_ip_noise_gamma_random_strength", "ss_loss_type", "ss_huber_schedule", "ss_huber_scale", "ss_huber_c",
    "ss_fp8_base", "ss_fp8_base_unet", "ss_validation_seed", "ss_validation_split", "ss_max_validation_steps",
    "ss_validate_every_n_epochs", "ss_validate_every_n_steps", "ss_resize_interpolation",
    "ss_training_finished_at", "ss_steps", "ss_epoch",
    "ss_network_args", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash",
}
TOML_DATASET_KEYS = {"ss_datasets", "ss_tag_frequency", "ss_dataset_dirs"}
COMMAND_LINE_DATASET_KEYS = {
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info",
}
BOOLS = ("ss_gradient_checkpointing", "ss_full_fp16", "ss_v2", "ss_cache_latents", "ss_lowram",
         "ss_zero_terminal_snr", "ss_debiased_estimation", "ss_noise_offset_random_strength",
         "ss_ip_noise_gamma_random_strength", "ss_fp8_base", "ss_fp8_base_unet")


def tagged_dir(root: Path, name: str, captions: list[str]) -> str:
    folder = root / name
    make_shapes_dataset(str(folder), len(captions), sizes=[(64, 64), (96, 64)], seed=len(captions))
    for i, caption in enumerate(captions):
        (folder / f"img_{i:04d}.txt").write_text(caption, encoding="utf-8")
    return str(folder)


def run_args(tmp_path: Path, model: str, **extra) -> list[str]:
    values = dict(pretrained_model_name_or_path=model, output_dir=str(tmp_path / "out"), output_name="lora",
                  network_module="networks.lora", network_dim=4, network_alpha=2.0, learning_rate=1e-3,
                  max_train_steps=2, seed=1, optimizer_type="AdamW", network_train_unet_only=True,
                  network_args=["conv_dim=2"], **extra)
    cfg = write_toml(tmp_path / "run.toml", "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return ["--config_file", cfg]


def saved_metadata(tmp_path: Path) -> dict[str, str]:
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        return f.metadata()


def check_common(md: dict[str, str], model: str) -> None:
    for key in BOOLS:
        assert md[key] in ("True", "False"), (key, md[key])
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["ss_network_dim"] == "4" and float(md["ss_network_alpha"]) == 2.0
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2"}
    assert md["ss_steps"] == "2" and md["ss_max_train_steps"] == "2" and md["ss_seed"] == "1"
    assert float(md["ss_learning_rate"]) == 1e-3 and md["ss_unet_lr"] == "None" and md["ss_clip_skip"] == "None"
    assert int(md["ss_session_id"]) >= 0 and float(md["ss_training_finished_at"]) >= float(
        md["ss_training_started_at"])
    assert md["ss_loss_type"] == "l2" and md["ss_optimizer"] == "torch.optim.adamw.AdamW"  # sd-scripts' module.Class
    assert md["ss_sd_scripts_commit_hash"].startswith("difftune/")
    assert md["ss_sd_model_name"] == Path(model).name
    data = Path(model).read_bytes()
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert md["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert int(md["ss_num_epochs"]) >= 1 and int(md["ss_num_batches_per_epoch"]) >= 1


def test_tag_frequency_is_sd_scripts_count():
    assert tag_frequency(["Red, circle", "red,square ,", " circle"]) == {"red": 2, "circle": 2, "square": 1}


def test_dataset_toml_run_writes_full_key_set(tmp_path, tiny_sdxl_file):
    a = tagged_dir(tmp_path, "dogs", ["sks dog, red, grass", "sks dog, Red", "sks dog"])
    b = tagged_dir(tmp_path, "cats", ["cat, blue", "cat"])
    reg = tagged_dir(tmp_path, "reg", ["dog"])
    ds = write_dataset_toml(tmp_path / "dataset.toml", {"resolution": 64, "batch_size": 2, "subsets": [
        {"image_dir": a, "num_repeats": 2}, {"image_dir": b, "num_repeats": 1},
        {"image_dir": reg, "is_reg": True, "class_tokens": "dog"}]},
        general={"caption_extension": ".txt", **BUCKETING})
    r = run_script("sdxl_train_network.py", *run_args(tmp_path, tiny_sdxl_file, dataset_config=ds,
                                                      training_comment="trained on dogs & cats"))
    assert r.returncode == 0, r.stderr[-3000:]
    md = saved_metadata(tmp_path)
    ss = {k for k in md if k.startswith("ss_")}
    assert COMMON_KEYS | TOML_DATASET_KEYS <= ss, sorted((COMMON_KEYS | TOML_DATASET_KEYS) - ss)
    assert not (COMMAND_LINE_DATASET_KEYS - TOML_DATASET_KEYS) & ss  # sd-scripts writes those only without a TOML
    check_common(md, tiny_sdxl_file)
    assert md["ss_training_comment"] == "trained on dogs & cats"
    # tags per directory, lower-cased; the reg directory is counted too
    assert json.loads(md["ss_tag_frequency"]) == {"dogs": {"sks dog": 3, "red": 2, "grass": 1},
                                                  "cats": {"cat": 2, "blue": 1}, "reg": {"dog": 1}}
    # train images with repeats: 3*2 + 2*1; reg: 1
    assert md["ss_num_train_images"] == "8" and md["ss_num_reg_images"] == "1"
    assert json.loads(md["ss_dataset_dirs"]) == {"dogs": {"n_repeats": 2, "img_count": 3},
                                                 "cats": {"n_repeats": 1, "img_count": 2}}
    (dataset,) = json.loads(md["ss_datasets"])
    assert dataset["is_dreambooth"] is True and dataset["resolution"] == [64, 64]
    assert dataset["batch_size_per_device"] == 2 and dataset["enable_bucket"] is True
    assert [s["image_dir"] for s in dataset["subsets"]] == ["dogs", "cats", "reg"]
    assert [s["is_reg"] for s in dataset["subsets"]] == [False, False, True]
    assert dataset["subsets"][2]["class_tokens"] == "dog"
    buckets = dataset["bucket_info"]["buckets"]
    assert sum(b["count"] for b in buckets.values()) == 8 + 8  # reg images are balanced up to the train count
    assert all(k.isdigit() and len(b["resolution"]) == 2 for k, b in buckets.items())  # by candidate index


def test_command_line_dataset_run_writes_flat_keys_and_no_metadata_keeps_minimum(tmp_path, tiny_sdxl_file):
    train = tmp_path / "train"
    tagged_dir(train, "3_sks dog", ["sks dog, red", "sks dog"])
    r = run_script("sdxl_train_network.py", *run_args(tmp_path, tiny_sdxl_file, train_data_dir=str(train),
                                                      resolution="64,64", train_batch_size=2, enable_bucket=True,
                                                      min_bucket_reso=32, max_bucket_reso=128,
                                                      bucket_reso_steps=32, caption_extension=".txt",
                                                      flip_aug=True))
    assert r.returncode == 0, r.stderr[-3000:]
    md = saved_metadata(tmp_path)
    ss = {k for k in md if k.startswith("ss_")}
    assert COMMON_KEYS | COMMAND_LINE_DATASET_KEYS <= ss, sorted((COMMON_KEYS | COMMAND_LINE_DATASET_KEYS) - ss)
    assert "ss_datasets" not in ss
    check_common(md, tiny_sdxl_file)
    assert md["ss_resolution"] == "64,64" and md["ss_batch_size_per_device"] == "2"
    assert md["ss_total_batch_size"] == "2" and md["ss_flip_aug"] == "True" and md["ss_color_aug"] == "False"
    assert md["ss_enable_bucket"] == "True" and md["ss_min_bucket_reso"] == "32"
    assert json.loads(md["ss_dataset_dirs"]) == {"3_sks dog": {"n_repeats": 3, "img_count": 2}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {}
    assert json.loads(md["ss_tag_frequency"]) == {"3_sks dog": {"sks dog": 2, "red": 1}}
    info = json.loads(md["ss_bucket_info"])
    assert sum(b["count"] for b in info["buckets"].values()) == 6 and "mean_img_ar_error" in info

    r = run_script("sdxl_train_network.py", *run_args(tmp_path, tiny_sdxl_file, train_data_dir=str(train),
                                                      resolution="64", no_metadata=True, caption_extension=".txt"))
    assert r.returncode == 0, r.stderr[-3000:]
    md = saved_metadata(tmp_path)
    assert {k for k in md if k.startswith("ss_")} == set(MINIMUM_KEYS)
    assert md["modelspec.title"] == "lora" and md["ss_network_dim"] == "4"
