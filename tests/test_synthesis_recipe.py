"""docs/synthesis_recipe.md, run step by step as a user would (subprocesses) on the tiny SDXL: 64 px images,
2 inference steps, 2 training steps. Each step consumes only what the previous steps wrote to disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_script, write_toml
from library.prompts.png_metadata import read_png_info

NUM_IMAGES = 4


def test_generate_canny_caption_config_train(tmp_path, tiny_sdxl_file):
    if not (REPO / "tools" / "canny.py").is_file():
        pytest.skip("tools/canny.py is not in this checkout yet")
    synth, cond, wc = tmp_path / "synth", tmp_path / "cond", tmp_path / "wildcards"
    wc.mkdir()
    (wc / "animal.txt").write_text("cat\ndog\nfox\nowl\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a __animal__ in a {forest|city|field} --n blurry\n")

    # 1. generate N images with wildcards
    r = run_script("sdxl_gen_img.py", "--ckpt", tiny_sdxl_file, "--outdir", str(synth), "--from_file", str(prompts),
                   "--wildcards", str(wc), "--images_per_prompt", str(NUM_IMAGES), "--batch_size", "2",
                   "--W", "64", "--H", "64", "--steps", "2", "--sampler", "euler_a", "--seed", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    images = sorted(synth.glob("*.png"))
    assert len(images) == NUM_IMAGES

    # 2. canny conditioning images, same file names in another folder (sd-scripts' single-image flags)
    cond.mkdir()
    for image in images:
        r = run_script("tools/canny.py", "--input", str(image), "--output", str(cond / image.name),
                       "--thres1", "32", "--thres2", "100")
        assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in cond.glob("*.png")) == [p.name for p in images]

    # 3. captions from the prompts stored in the PNGs
    r = run_script("tools/captions_from_png.py", "--image_dir", str(synth))
    assert r.returncode == 0, r.stderr[-2000:]
    for image in images:
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption == read_png_info(image).prompt and caption.startswith("a photo of a ")

    # 4. the dataset config
    dataset = tmp_path / "dataset.toml"
    r = run_script("tools/write_dataset_config.py", "--image_dir", str(synth), "--conditioning_data_dir", str(cond),
                   "--resolution", "64", "--batch_size", "2", "--output", str(dataset))
    assert r.returncode == 0, r.stderr[-2000:]

    # 5. train ControlNet-LLLite with accelerate launch and a run config
    out = tmp_path / "out"
    values = dict(pretrained_model_name_or_path=tiny_sdxl_file, dataset_config=str(dataset), output_dir=str(out),
                  output_name="lllite", network_dim=8, cond_emb_dim=8, learning_rate=1e-3, max_train_steps=2,
                  seed=1, loss_log_file=str(tmp_path / "loss.jsonl"))
    run_toml = write_toml(tmp_path / "run.toml",
                          "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "sdxl_train_control_net_lllite.py"), "--config_file", run_toml]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    weights = load_file(str(out / "lllite.safetensors"))
    assert "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.conditioning1.0.weight" in weights
    assert len((tmp_path / "loss.jsonl").read_text().splitlines()) == 2
