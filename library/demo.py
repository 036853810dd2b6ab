"""The end-to-end demo on an embedded default: tiny SDXL model + generated dataset -> LoRA -> images.

    make demo            (or: .venv/bin/python -m library.demo --output_dir demo_output)

Every step runs the user-facing script as a subprocess, exactly as a user would type it, so the demo is also a
walkthrough: the commands are printed before they run, with the time each took.

The tiny model is randomly initialised, so every image it generates is noise by design. What shows the LoRA learning
is the loss curve (`loss_curve.png`) and the difference the LoRA makes to images of the same seeds
(`lora_difference.png`); the final printout summarises both.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from library.cli import run_main
from library.demo_report import draw_difference_sheet, draw_loss_curve, pair_images, read_loss_log, summarise_losses
from library.errors import UserError
from library.torchvision_notice import SHOWN_ENV

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
loss_log_file = "{loss_log}"
sample_prompts = "{prompts}"
sample_every_n_steps = {half}
sample_sampler = "euler_a"
"""

PROMPTS = "a {{red|blue|green}} {{square|circle}} on the {{left|right}} --w 128 --h 128 --s {steps} --d {seed} --l 5\n"


def child_env() -> dict[str, str]:
    """The scripts' environment. One CPU thread unless the user chose otherwise: the tiny model gains little from
    more, and on a busy machine (more runnable jobs than cores) several threads per op wait on each other: a demo
    training step took 20-30 s with torch's default two threads and 1.3 s with one on the same loaded 2-core box.
    Without torchvision, say once here what each script would otherwise repeat."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"
        print("note: the scripts below run with OMP_NUM_THREADS=1 (the tiny model gains little from more threads; "
              "set OMP_NUM_THREADS to choose)", flush=True)
    if importlib.util.find_spec("torchvision") is None and not env.get(SHOWN_ENV):
        print("note: torchvision is not installed, so transformers uses its PIL image processors; the toolkit does "
              "not need torchvision (this is said once, not by every script)", flush=True)
        env[SHOWN_ENV] = "1"
    return env


def run(cmd: list[str], env: dict[str, str]) -> None:
    """Run one step as the user would type it; a failing step stops the demo with its name and exit code."""
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    code = subprocess.run(cmd, check=False, env=env, cwd=str(REPO)).returncode
    if code != 0:
        raise UserError(f"demo step `{Path(cmd[1]).name}` failed with exit code {code}; its output is above")
    print(f"({time.time() - t0:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num_images", type=int, default=12)
    p.add_argument("--gen_steps", type=int, default=8, help="denoising steps of the generated images")
    p.add_argument("--images_per_prompt", type=int, default=4)
    args = p.parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = child_env()
    t0 = time.time()

    model = out / "model" / "tiny_sdxl.safetensors"
    if not model.exists():
        run([py, "tools/make_tiny_model.py", "--family", "sdxl", "--format", "single_file", "--output", str(model)],
            env)

    from library.data.synthetic import make_shapes_dataset

    image_dir = out / "dataset" / "images"
    make_shapes_dataset(str(image_dir), args.num_images, sizes=[(128, 128), (160, 96), (96, 160)], seed=0)
    print(f"\nwrote {args.num_images} training images with captions to {image_dir}")
    dataset_config = out / "dataset.toml"
    dataset_config.write_text(DATASET_TOML.format(image_dir=image_dir.as_posix()))
    run([py, "tools/dataset_info.py", "--dataset_config", str(dataset_config)], env)

    prompts = out / "sample_prompts.txt"
    prompts.write_text(PROMPTS.format(seed=1, steps=args.gen_steps))
    loss_log = out / "loss.jsonl"
    loss_log.unlink(missing_ok=True)  # the trainer appends; a rerun must not plot the previous run's losses
    run_config = out / "run.toml"
    run_config.write_text(RUN_TOML.format(model=model.as_posix(), dataset_config=dataset_config.as_posix(),
                                          output_dir=(out / "lora").as_posix(), steps=args.steps,
                                          half=max(1, args.steps // 2), logging_dir=(out / "logs").as_posix(),
                                          loss_log=loss_log.as_posix(), prompts=prompts.as_posix()))
    run([py, "sdxl_train_network.py", "--config_file", str(run_config)], env)
    lora = out / "lora" / "demo_lora.safetensors"

    gen_prompts = out / "gen_prompts.txt"
    gen_prompts.write_text("a {red|blue|green} {square|circle} on the {left|right} --n blurry\n")
    generated = {"base": out / "generated" / "base", "with_lora": out / "generated" / "with_lora"}
    for name, mul in (("base", "0"), ("with_lora", "1")):
        for old in generated[name].glob("*.png"):  # names carry a timestamp: keep only this run's images
            old.unlink()
        run([py, "sdxl_gen_img.py", "--ckpt", str(model), "--from_file", str(gen_prompts), "--outdir",
             str(generated[name]), "--images_per_prompt", str(args.images_per_prompt), "--W", "128", "--H",
             "128", "--steps", str(args.gen_steps),
             "--scale", "5", "--sampler", "euler_a", "--seed", "7", "--network_module", "networks.lora",
             "--network_weights", str(lora), "--network_mul", mul], env)

    points = read_loss_log(loss_log)
    losses = summarise_losses(points)
    loss_png = draw_loss_curve(points, out / "loss_curve.png")
    change = draw_difference_sheet(pair_images(generated["base"], generated["with_lora"]),
                                   out / "lora_difference.png")

    print(f"\ndemo finished in {time.time() - t0:.0f} s. Outputs under {out}:")
    print(f"  model:            {model}")
    print(f"  dataset + config: {image_dir}, {dataset_config}")
    print(f"  run config:       {run_config}")
    print(f"  LoRA:             {lora}")
    print(f"  training samples: {out / 'lora' / 'sample'}")
    print(f"  generated images: {generated['base']} (multiplier 0), {generated['with_lora']}")
    print(f"  loss curve:       {loss_png}")
    print(f"  LoRA difference:  {out / 'lora_difference.png'}")
    print(f"  TensorBoard logs: tensorboard --logdir {out / 'logs'}")
    print("\nThe tiny model is randomly initialised (it has never seen a real image), so the pictures it generates,")
    print("with or without the LoRA, are noise by design. What shows the LoRA learning:")
    print(f"  loss: {losses.first:.3f} -> {losses.last:.3f} over {losses.steps} steps (mean of the first and last "
          f"{losses.window} steps; {'down' if losses.last < losses.first else 'not down'})")
    print(f"  the LoRA changed the images: mean abs pixel change {change.mean_abs:.1f}/255 over {change.pairs} "
          f"image pair(s) with the same seeds (largest {change.max_abs}/255)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
