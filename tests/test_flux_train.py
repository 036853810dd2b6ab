"""flux_train_network.py on the shared loop: smoke run, stored-loss regression, clear device errors, Kontext pairs.

Regenerate the stored losses after an intended change of the training numerics:
    .venv/bin/python tests/test_flux_train.py
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, build_shapes_dataset, run_script, write_toml  # noqa: E402

REGRESSION_FILE = REPO / "tests" / "data" / "loss_regression_flux_lora.json"
REGRESSION_STEPS = 3


def flux_toml(tmp_path: Path, model: str, dataset_config: str, name: str = "run", **extra) -> str:
    values = dict(pretrained_model_name_or_path=model, dataset_config=dataset_config, output_dir=str(tmp_path / "out"),
                  output_name="lora", network_module="networks.lora_flux", network_dim=4, network_alpha=4.0,
                  learning_rate=1e-3, max_train_steps=2, seed=1, optimizer_type="AdamW", t5xxl_max_token_length=16,
                  timestep_sampling="shift", model_prediction_type="raw", guidance_scale=1.0,
                  loss_log_file=str(tmp_path / f"{name}_loss.jsonl"))
    values.update(extra)
    return write_toml(tmp_path / f"{name}.toml", "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n")


def read_losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_smoke_run_writes_kohya_flux_lora_and_matches_stored_losses(tmp_path, tiny_flux_single):
    ds = build_shapes_dataset(tmp_path)
    cfg = flux_toml(tmp_path, tiny_flux_single, ds["config"], max_train_steps=REGRESSION_STEPS)
    r = run_script("flux_train_network.py", "--config_file", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out" / "lora.safetensors"
    sd = load_file(str(out))
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, 32)
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in sd
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in sd)
    assert not any(k.startswith("lora_te3_") for k in sd)  # T5 only with train_t5xxl=True
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))  # it trained
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_steps"] == str(REGRESSION_STEPS)
    losses = read_losses(tmp_path / "run_loss.jsonl")
    assert len(losses) == REGRESSION_STEPS and all(math.isfinite(v) for v in losses)
    stored = json.loads(REGRESSION_FILE.read_text())["losses"]
    for got, want in zip(losses, stored, strict=True):
        assert math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-5), (losses, stored)


def test_gpu_only_flags_warn_on_cpu_and_training_goes_on(tmp_path, tiny_flux_single, capsys):
    import flux_train_network
    from library.cli import run_main

    if torch.cuda.is_available():
        pytest.skip("checks the CPU message")
    ds = build_shapes_dataset(tmp_path)
    # --fp8_base works on the CPU (tests/test_flux_lowvram.py); block swapping needs a GPU: a config from a GPU box
    # trains here without swapping, after one warning
    argv = ["--config_file", flux_toml(tmp_path, tiny_flux_single, ds["config"]), "--blocks_to_swap", "4",
            "--split_mode", "--highvram"]
    assert run_main(flux_train_network.main, argv) == 0
    err = capsys.readouterr().err
    assert "--blocks_to_swap 4: no CUDA GPU" in err and "Traceback" not in err
    assert "--split_mode" in err and "--highvram" in err
    argv = ["--config_file", flux_toml(tmp_path, tiny_flux_single, ds["config"]), "--kontext_degrade", "sharpen=2"]
    assert run_main(flux_train_network.main, argv) == 1
    assert "--kontext_degrade" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Kontext-style pairs, through the family hooks the loop calls
@pytest.fixture(scope="module")
def kontext_setup(tiny_flux_single):
    from library.config.flux_config import FluxConfig, FluxModelConfig
    from library.families.flux import FluxFamily

    cfg = FluxModelConfig(pretrained_model_name_or_path=tiny_flux_single,
                          flux=FluxConfig(kontext=True, t5xxl_max_token_length=8, model_prediction_type="raw"))
    family = FluxFamily(cfg)
    models = family.load_models(torch.float32)
    return family, models


def _batch(seed: int, size: int = 32) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    control = torch.rand(2, 3, size, size, generator=g)
    return SimpleNamespace(images=images, conditioning_images=control, captions=["a red circle", "a blue square"],
                           alpha_masks=None)


def test_kontext_loss_is_on_target_tokens_and_depends_on_the_control(kontext_setup):
    family, models = kontext_setup
    batch = _batch(0)
    latents = family.encode_images(models, batch.images, sample=False)
    text = family.encode_text(models, batch.captions)
    inp = family.noise_and_timesteps(latents, [torch.Generator().manual_seed(i) for i in range(2)],
                                     SimpleNamespace(noise_offset=None))
    seen: dict = {}

    def keep(module, args, kwargs, output):
        seen["ids"] = kwargs["img_ids"]
        seen["out"] = output.sample
        output.sample.retain_grad()

    handle = models.denoiser.register_forward_hook(keep, with_kwargs=True)
    try:
        pred = family.predict(models, inp, text, batch)
        loss = torch.nn.functional.mse_loss(pred, family.loss_target(models, latents, inp))
        loss.backward()
    finally:
        handle.remove()
        models.denoiser.zero_grad(set_to_none=True)
    n_target = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
    assert pred.shape == latents.shape
    assert seen["out"].shape[1] == 2 * n_target  # target tokens + control tokens went in
    grad = seen["out"].grad
    assert grad[:, :n_target].abs().sum() > 0 and grad[:, n_target:].abs().sum() == 0
    ids = seen["ids"]
    assert torch.all(ids[:n_target, 0] == 0) and torch.all(ids[n_target:, 0] == 1)
    assert torch.equal(ids[:n_target, 1:], ids[n_target:, 1:])  # same grid, its own index
    with torch.no_grad():
        again = family.predict(models, inp, text, batch)
        swapped = SimpleNamespace(**{**vars(batch), "conditioning_images": _batch(9).conditioning_images})
        other = family.predict(models, inp, text, swapped)
    torch.testing.assert_close(again, pred.detach())
    assert (other - pred.detach()).abs().max() > 1e-4


def test_kontext_degrade_and_missing_control(kontext_setup):
    from library.data.degrade import parse_degrade_spec
    from library.errors import UserError

    family, models = kontext_setup
    batch = _batch(1)
    latents = family.encode_images(models, batch.images, sample=False)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    inp = family.noise_and_timesteps(latents, gens, SimpleNamespace(noise_offset=None))
    no_control = SimpleNamespace(**{**vars(batch), "conditioning_images": None})
    with pytest.raises(UserError, match="conditioning_data_dir"):
        family.control_latents(models, no_control, inp)
    family._degrade_spec = parse_degrade_spec("downsample=2,noise=0.05")
    try:
        degraded = family.control_latents(models, no_control, inp)
        clean = family.encode_images(models, batch.images, sample=False)
        assert degraded.shape == clean.shape and (degraded - clean).abs().mean() > 1e-3
        torch.testing.assert_close(family.control_latents(models, no_control, inp), degraded)  # seeded per step
        with pytest.raises(UserError, match="cache_latents"):
            family.control_latents(models, SimpleNamespace(**{**vars(no_control), "images": None}), inp)
    finally:
        family._degrade_spec = None


def test_kontext_training_run(tmp_path, tiny_flux_single):
    import flux_train_network

    ds = build_shapes_dataset(tmp_path)
    cfg = flux_toml(tmp_path, tiny_flux_single, ds["cn_config"], name="kontext", kontext=True,
                    network_train_unet_only=True)
    assert flux_train_network.main(["--config_file", cfg]) == 0
    assert len(read_losses(tmp_path / "kontext_loss.jsonl")) == 2
    assert "lora_unet_double_blocks_1_txt_mlp_2.lora_up.weight" in load_file(str(tmp_path / "out" / "lora.safetensors"))


def regenerate() -> None:
    import tempfile

    from library.models.tiny_flux import save_tiny_flux

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = save_tiny_flux(str(tmp / "model"), "single_file", seed=0)
        ds = build_shapes_dataset(tmp)
        r = run_script("flux_train_network.py", "--config_file",
                       flux_toml(tmp, model, ds["config"], max_train_steps=REGRESSION_STEPS))
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        losses = read_losses(tmp / "run_loss.jsonl")
    REGRESSION_FILE.parent.mkdir(parents=True, exist_ok=True)
    REGRESSION_FILE.write_text(json.dumps({"script": "flux_train_network.py", "losses": losses}, indent=1) + "\n")
    print(f"wrote {REGRESSION_FILE}: {losses}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    regenerate()
