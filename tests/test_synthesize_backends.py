"""tools/synthesize.py backends on tiny models (64 px, 2 steps): output metadata and YOLO labels, FLUX + LoRA +
FLUX ControlNet, SDXL + pretrained ControlNet (plain, from the tiny U-Net, and union), FLUX training inputs, and the
option checks. ControlNets get random zero-convolutions so that they visibly act."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_random_lora
from library.errors import UserError
from library.synth import pipeline, training
from test_synthesize import make_inputs, options, read_jsonl, tiny_depth_model


def _randomise(model: torch.nn.Module, seed: int, prefixes: tuple[str, ...]) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefixes):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory, tiny_flux_single) -> dict[str, str]:
    from diffusers import FluxControlNetModel

    from library.models.tiny_flux import TINY_FLUX_TRANSFORMER, build_tiny_flux
    from networks.lora_flux import create_network

    root = tmp_path_factory.mktemp("flux")
    out = {"model": tiny_flux_single}
    torch.manual_seed(0)
    cn = FluxControlNetModel(**{**TINY_FLUX_TRANSFORMER, "num_layers": 1, "num_single_layers": 1})
    _randomise(cn, 5, ("controlnet_x_embedder", "controlnet_blocks", "controlnet_single_blocks"))
    cn.save_pretrained(root / "cn")
    out["controlnet"] = str(root / "cn")
    m = build_tiny_flux(0)
    net = create_network(1.0, 4, 4.0, m.ae, [m.clip_l, m.t5], m.transformer)
    out["lora"] = save_random_lora(net, root / "lora.safetensors")
    return out


@pytest.fixture(scope="module")
def sdxl_controlnets(tmp_path_factory) -> dict[str, str]:
    from diffusers import ControlNetModel, ControlNetUnionModel

    from library.models.tiny import build_tiny_sdxl

    unet = build_tiny_sdxl(0).unet
    root = tmp_path_factory.mktemp("sdxl_cn")
    torch.manual_seed(0)
    prefixes = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    _randomise(cn, 1, prefixes)
    cn.save_pretrained(root / "cn")
    shape = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16),
                                           load_weights_from_unet=False).config
    config = {k: v for k, v in shape.items() if k != "_use_default_values"}
    union = ControlNetUnionModel.from_config({**config, "num_trans_channel": 32, "num_trans_head": 2,
                                              "num_proj_channel": 32})
    _randomise(union, 2, prefixes)
    union.save_pretrained(root / "union")
    return {"plain": str(root / "cn"), "union": str(root / "union")}


def test_meta_and_yolo_labels(tmp_path, tiny_sdxl_file):
    inputs = make_inputs(tmp_path)
    s = pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, yolo_labels=True, controlnet_types=[]))
    out = tmp_path / "out"
    assert s.kept == 2
    det, cls = read_jsonl(out / "predictions.jsonl")
    meta = det["raw"]["meta"]
    assert meta["generated"] is True and meta["source_image_id"] == "a" and meta["lora_path"] is None
    assert meta["controlnet_types"] == [] and meta["prompt"] == "a photo with 2 dogs and a cat"
    assert meta["seed"] == det["synthetic"]["seed"]  # the synthetic block stays
    assert cls["raw"]["meta"]["source_image_id"] == "b"
    labels = out / "labels"
    assert (labels / "classes.txt").read_text() == "cat\ndog\ntraffic_light\n"
    lines = [l.split() for l in (labels / "synthetic_0001.txt").read_text().splitlines()]
    # source 128x96 -> 64x64; box [10, 10, 40, 40] -> [5, 6.67, 20, 26.67]
    assert [l[0] for l in lines] == ["1", "1", "0"]
    assert [float(v) for v in lines[0][1:]] == pytest.approx([12.5 / 64, 16.667 / 64, 15 / 64, 20 / 64], abs=1e-4)
    assert not (labels / "synthetic_0002.txt").exists()  # classification: no boxes, no label file


def test_flux_backend_with_lora_and_controlnet(tmp_path, tiny_flux):
    inputs = make_inputs(tmp_path)
    common = dict(backend="flux", num_samples=1, lora_path=tiny_flux["lora"], skip_training=False,
                  t5xxl_max_token_length=16)
    s = pipeline.run(options(tmp_path, tiny_flux["model"], inputs, output_dir=str(tmp_path / "plain"), **common))
    assert s.generated == 1
    s = pipeline.run(options(tmp_path, tiny_flux["model"], inputs, output_dir=str(tmp_path / "cn"),
                             control_net_model=tiny_flux["controlnet"], **common))
    assert s.generated == 1
    plain = _pixels(tmp_path / "plain" / "images" / "synthetic_0001.png")
    guided = _pixels(tmp_path / "cn" / "images" / "synthetic_0001.png")
    assert plain.shape == guided.shape == (64, 64, 3) and np.abs(plain - guided).max() > 0
    (rec,) = read_jsonl(tmp_path / "cn" / "predictions.jsonl")
    assert rec["raw"]["meta"]["controlnet_types"] == ["canny"]
    assert rec["raw"]["meta"]["lora_path"] == str(Path(tiny_flux["lora"]).resolve())
    s = pipeline.run(options(tmp_path, tiny_flux["model"], inputs, output_dir=str(tmp_path / "cn"),
                             control_net_model=tiny_flux["controlnet"], **common))
    assert (s.generated, s.reused) == (0, 1)


def test_sdxl_controlnet_plain_and_union(tmp_path, tiny_sdxl_file, sdxl_controlnets):
    inputs = make_inputs(tmp_path)
    base = dict(num_samples=1, controlnet_types=["canny"])
    pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, output_dir=str(tmp_path / "base"), **base))
    pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, output_dir=str(tmp_path / "cn"),
                         control_net_model=sdxl_controlnets["plain"], **base))
    depth = tiny_depth_model(tmp_path / "dpt")
    pipeline.run(options(tmp_path, tiny_sdxl_file, inputs, output_dir=str(tmp_path / "union"),
                         control_net_model=sdxl_controlnets["union"], control_net_types=["canny", "depth"],
                         depth_model=depth, **base))
    images = {k: _pixels(tmp_path / k / "images" / "synthetic_0001.png") for k in ("base", "cn", "union")}
    assert np.abs(images["base"] - images["cn"]).max() > 0
    assert np.abs(images["base"] - images["union"]).max() > 0
    (rec,) = read_jsonl(tmp_path / "union" / "predictions.jsonl")
    assert rec["raw"]["meta"]["controlnet_types"] == ["canny", "depth"]
    assert (tmp_path / "union" / "controlnet_conditions" / "depth" / "synthetic_0001_depth.png").is_file()


def test_flux_training_inputs_use_the_flux_trainer(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(img)
    settings = training.TrainingSettings(model="/m/flux.safetensors", resolution=64, steps=2, backend="flux",
                                         model_files=(("ae", "/m/ae.safetensors"), ("t5xxl_max_token_length", 16)))
    run = training.write_training_inputs(tmp_path / "lora", [(str(img), "a photo")], settings)
    text = run.read_text()
    assert 'network_module = "networks.lora_flux"' in text and 'ae = "/m/ae.safetensors"' in text
    assert "t5xxl_max_token_length = 16" in text
    assert training.trainer_for("flux").script == "flux_train_network.py"
    assert 'network_module = "networks.lora"' in training.write_training_inputs(
        tmp_path / "sdxl", [(str(img), "a photo")], training.TrainingSettings("/m/sdxl.safetensors", 64, 2)
    ).read_text()
    with pytest.raises(UserError, match="no LoRA trainer"):
        training.trainer_for("sd3")


def test_backend_option_errors(tmp_path, sdxl_controlnets, tiny_flux):
    inputs = make_inputs(tmp_path)
    lllite = tmp_path / "l.safetensors"
    lllite.write_bytes(b"x")
    for bad, match in [(dict(backend="sd3"), "unknown backend"),
                       (dict(backend="flux", lllite_path=str(lllite)), "LLLite is for SDXL"),
                       (dict(ae=str(lllite)), "add --backend flux"),
                       (dict(control_net_types=["canny"]), "no --control_net_model"),
                       (dict(control_net_model=sdxl_controlnets["union"]), "union model"),
                       (dict(control_net_model=sdxl_controlnets["plain"], control_net_types=["canny", "depth"]),
                        "not a union model"),
                       (dict(control_net_model=tiny_flux["controlnet"]), "sdxl backend cannot use"),
                       (dict(control_net_model=str(tmp_path)), "no config.json")]:
        with pytest.raises(UserError, match=match):
            pipeline.run(options(tmp_path, "unused.safetensors", inputs, **bad))
    assert not (tmp_path / "out").exists()


def test_generation_cost_bench_smoke(tmp_path):
    """bench/bench_generation_cost.py in-process at 64 px, 2 steps, 1 image: the report is complete (no timing
    assertions: the machine is shared)."""
    import importlib.util
    import json

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_generation_cost", REPO / "bench" / "bench_generation_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cost.json"
    assert bench.main(["--resolution", "64", "--steps", "2", "--images", "1", "--warmup", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"plain", "lllite", "controlnet"}
    assert report["variants"]["plain"]["ratio_to_plain"] == 1.0
    assert all(v["seconds_per_image"] > 0 and len(v["times"]) == 1 for v in report["variants"].values())
