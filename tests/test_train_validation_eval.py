"""Held-out validation loss and DINO / CLIP evaluation during training, through sdxl_train_network.py."""
from __future__ import annotations

import json
import re

import pytest

from conftest import run_script, write_dataset_toml
from test_train_sdxl_network import run_toml


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory) -> dict:
    from library.eval.tiny_models import save_tiny_clip, save_tiny_dino

    root = tmp_path_factory.mktemp("eval_models")
    return {"dino": str(save_tiny_dino(str(root / "dino"), seed=0)), "clip": str(save_tiny_clip(str(root / "clip"), seed=0))}


def _split_dataset(tmp_path) -> str:
    from library.data.synthetic import make_shapes_dataset

    make_shapes_dataset(str(tmp_path / "img"), 6, sizes=[(64, 64)], seed=5)
    subset = {"image_dir": str(tmp_path / "img"), "validation_split": 0.34, "validation_seed": 1}
    return write_dataset_toml(tmp_path / "ds.toml", {"resolution": 64, "batch_size": 2, "subsets": [subset]},
                              general={"caption_extension": ".txt"})


def _validation_losses(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"validation loss ([0-9.]+)", text)]


def test_validation_loss_and_eval_report(tmp_path, tiny_sdxl_file, eval_models):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sksShape square --w 64 --h 64 --s 2 --d 1\na sksShape circle --w 64 --h 64 --s 2 --d 2\n")
    ds = _split_dataset(tmp_path)
    cfg = run_toml(tmp_path, tiny_sdxl_file, ds, max_train_steps=2, network_train_unet_only=True,
                   validate_every_n_steps=1, eval_every_n_steps=1, eval_dino_model=eval_models["dino"],
                   eval_clip_model=eval_models["clip"], eval_rare_token="sksShape", sample_prompts=str(prompts),
                   sample_sampler="euler", logging_dir=str(tmp_path / "logs"))
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _validation_losses(r.stdout)
    assert len(losses) == 2 and all(v > 0 for v in losses)

    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["step"] == 2
    for key in ("dino", "clip_i", "clip_t"):
        assert 0.0 < abs(report["lora"][key]) <= 1.0
        assert report["gain"][key] == pytest.approx(report["lora"][key] - report["baseline"][key])
    assert report["lora"]["num_generated"] == 2 and report["lora"]["num_real"] == 2
    assert all("sksShape" not in row["clip_t_prompt"] for row in report["lora"]["images"])
    # the held-out images were not trained on: 6 images, 2 held out -> 4 training samples per epoch
    assert "4 samples per epoch" in r.stdout
    acc = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/validation" in tags and "eval/dino" in tags and "eval/gain_clip_i" in tags


def test_validation_loss_is_fixed_noise(tmp_path, tiny_sdxl_file):
    """Noise and timesteps of the validation loss are fixed: with a network that (practically) does not change, the
    loss is the same at every step, so its changes during training come from the network alone."""
    ds = _split_dataset(tmp_path)
    cfg = run_toml(tmp_path, tiny_sdxl_file, ds, max_train_steps=3, learning_rate=1e-12,
                   network_train_unet_only=True, validate_every_n_steps=1)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _validation_losses(r.stdout)
    assert len(losses) == 3
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)


def test_zero_learning_rate_is_a_clear_error(tmp_path, tiny_sdxl_file, shapes_dataset):
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], learning_rate=0.0)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no trainable parameters" in r.stderr
