"""sdxl_train_network.py driven as users drive it: a subprocess with a TOML run config, on the tiny model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, run_script, write_toml


def run_toml(tmp_path: Path, model: str, dataset_config: str, name: str = "run", **extra) -> str:
    values = dict(pretrained_model_name_or_path=model, dataset_config=dataset_config, output_dir=str(tmp_path / "out"),
                  output_name="lora", network_module="networks.lora", network_dim=4, network_alpha=4.0,
                  learning_rate=1e-3, max_train_steps=2, seed=1, optimizer_type="AdamW",
                  loss_log_file=str(tmp_path / f"{name}_loss.jsonl"))
    values.update(extra)
    lines = ["[model]"]
    for k, v in values.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return write_toml(tmp_path / f"{name}.toml", "\n".join(lines) + "\n")


def read_losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_two_step_smoke_writes_kohya_lora(tmp_path, tiny_sdxl_file, shapes_dataset):
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], logging_dir=str(tmp_path / "logs"))
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out" / "lora.safetensors"
    assert out.is_file()
    sd = load_file(str(out))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in sd)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in sd)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "4" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["ss_steps"] == "2"
    assert len(read_losses(tmp_path / "run_loss.jsonl")) == 2
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*")), "TensorBoard log missing"


def test_output_config_then_flags_override_it(tmp_path, tiny_sdxl_file, shapes_dataset):
    out_cfg = tmp_path / "written.toml"
    r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_sdxl_file,
                   "--dataset_config", shapes_dataset["config"], "--output_dir", str(tmp_path / "out"),
                   "--output_name", "lora", "--network_dim", "2", "--max_train_steps", "5",
                   "--output_config", "--config_file", str(out_cfg))
    assert r.returncode == 0, r.stderr
    text = out_cfg.read_text()
    assert "network_dim = 2" in text and "max_train_steps = 5" in text
    # the written config trains as given, and explicit flags win over it
    r = run_script("sdxl_train_network.py", "--config_file", str(out_cfg), "--max_train_steps", "1",
                   "--network_train_unet_only")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "after 1 steps" in r.stdout
    sd = load_file(str(tmp_path / "out" / "lora.safetensors"))
    down = sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    assert down.shape[0] == 2
    assert not any(k.startswith("lora_te") for k in sd)


@pytest.mark.parametrize("content, expected", [
    ('network_dimm = 4\n', ["network_dimm", "did you mean 'network_dim'"]),
    ('network_dim = "four"\n', ["network_dim", "expected int"]),
    ('network_dim = 4\n[x\n', ["line"]),
])
def test_bad_run_config_is_one_clear_error(tmp_path, content, expected):
    cfg = write_toml(tmp_path / "bad.toml", content)
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "bad.toml" in r.stderr
    for e in expected:
        assert e in r.stderr


def test_missing_model_and_dataset_are_clear_errors(tmp_path, shapes_dataset):
    r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", str(tmp_path / "nope.safetensors"),
                   "--dataset_config", shapes_dataset["config"], "--network_dim", "4", "--output_dir", str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "nope.safetensors" in r.stderr
    r = run_script("sdxl_train_network.py", "--pretrained_model_name_or_path", "x", "--network_dim", "4")
    assert r.returncode == 1 and "--dataset_config" in r.stderr


def test_loss_goes_down_on_fixed_data(tmp_path, tiny_sdxl_file, shapes_dataset):
    """With timesteps in a narrow band the noise level is comparable across steps, so the trend is visible."""
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=40, learning_rate=1e-2,
                   min_timestep=700, max_timestep=701, network_train_unet_only=True, cache_latents=True,
                   network_args=["conv_dim=4", "conv_alpha=4"])
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = read_losses(tmp_path / "run_loss.jsonl")
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)


def test_loss_regression_against_stored_values(tmp_path, tiny_sdxl_file, shapes_dataset):
    stored = json.loads((REPO / "tests" / "data" / "loss_regression_sdxl_lora.json").read_text())
    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=len(stored["losses"]))
    r = run_script("sdxl_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = read_losses(tmp_path / "run_loss.jsonl")
    for got, want in zip(losses, stored["losses"]):
        assert math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-5), (losses, stored["losses"])


def test_resume_continues_step_count_and_weights(tmp_path, tiny_sdxl_file, shapes_dataset):
    common = dict(network_train_unet_only=True, save_every_n_steps=3, save_state=True, max_train_steps=5)
    full = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], name="full",
                    output_dir=str(tmp_path / "full"), **common)
    r = run_script("sdxl_train_network.py", "--config_file", full)
    assert r.returncode == 0, r.stderr[-3000:]
    state = tmp_path / "full" / "lora-step00000003-state"
    assert (state / "loop_state.json").is_file()
    assert json.loads((state / "loop_state.json").read_text())["global_step"] == 3

    resumed = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], name="resumed",
                       output_dir=str(tmp_path / "resumed"), resume=str(state), **common)
    r = run_script("sdxl_train_network.py", "--config_file", resumed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    full_losses = read_losses(tmp_path / "full_loss.jsonl")
    resumed_losses = read_losses(tmp_path / "resumed_loss.jsonl")
    assert len(resumed_losses) == 2  # steps 4 and 5 only
    assert resumed_losses == pytest.approx(full_losses[3:], rel=1e-4, abs=1e-6)
    a = load_file(str(tmp_path / "full" / "lora.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "lora.safetensors"))
    with safe_open(str(tmp_path / "resumed" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "5"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_interrupt_saves_weights_and_state(tmp_path, tiny_sdxl_file, shapes_dataset, monkeypatch):
    from library.train import loop

    calls = {"n": 0}
    original = loop.Trainer._load

    def interrupt_on_third(self, pb, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, pb, indices)

    monkeypatch.setattr(loop.Trainer, "_load", interrupt_on_third)
    import sdxl_train_network

    cfg = run_toml(tmp_path, tiny_sdxl_file, shapes_dataset["config"], max_train_steps=10, network_train_unet_only=True)
    with pytest.raises(KeyboardInterrupt):
        sdxl_train_network.main(["--config_file", cfg])
    assert (tmp_path / "out" / "lora-interrupted.safetensors").is_file()
    state = json.loads((tmp_path / "out" / "lora-interrupted-state" / "loop_state.json").read_text())
    assert state["global_step"] == 2
