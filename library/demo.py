"""The end-to-end demo on an embedded default: tiny SDXL model + generated dataset -> LoRA -> images.

    make demo            (or: .venv/bin/python -m library.demo --output_dir demo_output)

Every step runs the user-facing script as a subprocess, exactly as a user would type it, so the demo is also a
walkthrough: the commands are printed before they run.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DATASET_TOML = """\
[general]
caption_extension = ".txt"
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 192
bucket_reso_steps = 32

[[datasets]]
resolution = 128
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{image_dir}"
  num_repeats = 2
"""

RUN_TOML = """\
[model]
pretrained_model_name_or_path = "{model}"

[dataset]
dataset_config = "{dataset_config}"

[network]
network_module = "networks.lora"
network_dim = 8
network_alpha = 8
network_args = ["conv_dim=4", "conv_alpha=4"]
network_train_unet_only = true

[training]
output_dir = "{output_dir}"
output_name = "demo_lora"
max_train_steps = {steps}
learning_rate = 5e-3
optimizer_type = "AdamW"
lr_scheduler = "cosine"
lr_warmup_steps = 0.1
cache_latents = true
seed = 0
save_every_n_steps = {half}
logging_dir = "{logging_dir}"
sample_prompts = "{prompts}"
sample_every_n_steps = {half}
sample_sampler = "euler_a"
"""

PROMPTS = "a {{red|blue|green}} {{square|circle}} on the {{left|right}} --w 128 --h 128 --s {steps} --d {seed} --l 5\n"


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, env=env, cwd=str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--num_images", type=int, default=12)
    p.add_argument("--gen_steps", type=int, default=8, help="denoising steps of the generated images")
    p.add_argument("--images_per_prompt", type=int, default=4)
    args = p.parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.time()

    model = out / "model" / "tiny_sdxl.safetensors"
    if not model.exists():
        run([py, "tools/make_tiny_model.py", "--family", "sdxl", "--format", "single_file", "--output", str(model)])

    from library.data.synthetic import make_shapes_dataset

    image_dir = out / "dataset" / "images"
    make_shapes_dataset(str(image_dir), args.num_images, sizes=[(128, 128), (160, 96), (96, 160)], seed=0)
    print(f"\nwrote {args.num_images} training images with captions to {image_dir}")
    dataset_config = out / "dataset.toml"
    dataset_config.write_text(DATASET_TOML.format(image_dir=image_dir.as_posix()))
    run([py, "tools/dataset_info.py", "--dataset_config", str(dataset_config)])

    prompts = out / "sample_prompts.txt"
    prompts.write_text(PROMPTS.format(seed=1, steps=args.gen_steps))
    run_config = out / "run.toml"
    run_config.write_text(RUN_TOML.format(model=model.as_posix(), dataset_config=dataset_config.as_posix(),
                                          output_dir=(out / "lora").as_posix(), steps=args.steps,
                                          half=max(1, args.steps // 2), logging_dir=(out / "logs").as_posix(),
                                          prompts=prompts.as_posix()))
    run([py, "sdxl_train_network.py", "--config_file", str(run_config)])
    lora = out / "lora" / "demo_lora.safetensors"

    gen_prompts = out / "gen_prompts.txt"
    gen_prompts.write_text("a {red|blue|green} {square|circle} on the {left|right} --n blurry\n")
    for name, mul in (("base", "0"), ("with_lora", "1")):
        run([py, "sdxl_gen_img.py", "--ckpt", str(model), "--from_file", str(gen_prompts), "--outdir",
             str(out / "generated" / name), "--images_per_prompt", str(args.images_per_prompt), "--W", "128", "--H",
             "128", "--steps", str(args.gen_steps),
             "--scale", "5", "--sampler", "euler_a", "--seed", "7", "--network_module", "networks.lora",
             "--network_weights", str(lora), "--network_mul", mul])

    print(f"\ndemo finished in {time.time() - t0:.0f} s. Outputs under {out}:")
    print(f"  model:            {model}")
    print(f"  dataset + config: {image_dir}, {dataset_config}")
    print(f"  run config:       {run_config}")
    print(f"  LoRA:             {lora}")
    print(f"  training samples: {out / 'lora' / 'sample'}")
    print(f"  generated images: {out / 'generated' / 'base'} (multiplier 0), {out / 'generated' / 'with_lora'}")
    print(f"  TensorBoard logs: tensorboard --logdir {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
