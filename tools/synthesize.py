"""Synthetic training data from predictions: for each annotated source image, an SDXL or FLUX image with a prompt
made from its labels ("a photo with 2 dogs and a cat"), optionally a LoRA trained on the sources, ControlNet-LLLite
(SDXL) or a pretrained ControlNet guided by the source's canny/depth map, filtered by a detector, written with records
in the input's format (and YOLO labels on request).

    python tools/synthesize.py --predictions predictions.jsonl --images_root imgs --output_dir out \
        --pretrained_model_name_or_path sdxl.safetensors --num_samples 100 --skip_training \
        --controlnet_types canny --filter my_detectors:detect --iou 0.5 --seed 1

See docs/synthesis.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from any folder

from library.cli import run_main  # noqa: E402

DEFAULT_YOLO_WEIGHTS = "yolov8n.pt"


def _thresholds(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers 'low,high', got {text!r}") from None
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input and output")
    g.add_argument("--predictions", required=True, help="predictions.jsonl (classification or detection records)")
    g.add_argument("--images_root", default=None, help="folder that raw.meta.rel_path is relative to")
    g.add_argument("--output_dir", required=True, help="output folder (images/, controlnet_conditions/, *.jsonl)")
    g.add_argument("--on_error", choices=("skip", "fail"), default="skip",
                   help="bad records or missing images: skip them with a warning (default) or stop")
    g = p.add_argument_group("generation")
    g.add_argument("--backend", choices=("sdxl", "flux"), default="sdxl", help="model family (default sdxl)")
    g.add_argument("--pretrained_model_name_or_path", "--ckpt", dest="model", required=True,
                   help="SDXL or FLUX single file, or diffusers folder")
    g.add_argument("--ae", default=None, help="FLUX: autoencoder file (with a BFL single-file model)")
    g.add_argument("--clip_l", default=None, help="FLUX: CLIP-L file (with a BFL single-file model)")
    g.add_argument("--t5xxl", default=None, help="FLUX: T5-XXL file (with a BFL single-file model)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None, help="FLUX: T5 tokens (default 512 dev)")
    g.add_argument("--num_samples", type=int, required=True, help="total synthetic images (sources are cycled)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps")
    g.add_argument("--resolution", type=int, default=1024, help="about this many pixels squared, aspect kept")
    g.add_argument("--scale", "--guidance_scale", dest="scale", type=float, default=None,
                   help="guidance scale (default: SDXL 7.5 classifier-free, FLUX 3.5 distilled)")
    g.add_argument("--sampler", default="euler_a", help="sampler name as in sdxl_gen_img.py")
    g.add_argument("--seed", type=int, default=0, help="run seed: sample i gets a seed derived from it and i")
    g.add_argument("--prompt_template", default="a photo with {labels}",
                   help="placeholders {labels} ('2 dogs and a cat'), {label}, {count}")
    g.add_argument("--negative_prompt", default=None)
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    g.add_argument("--tokenizer_cache_dir", default=None)
    g = p.add_argument_group("conditioning")
    g.add_argument("--controlnet_types", default="canny", help="comma list of canny, depth")
    g.add_argument("--canny_thresholds", type=_thresholds, default=(100, 200), help="low,high (default 100,200)")
    g.add_argument("--depth_model", default=None, help="local transformers depth-estimation model folder")
    g.add_argument("--lllite_path", default=None, help="ControlNet-LLLite file, guided by the source's canny map")
    g.add_argument("--lllite_multiplier", type=float, default=1.0)
    g.add_argument("--control_net_model", default=None,
                   help="diffusers ControlNet / ControlNet-Union (SDXL) or FluxControlNetModel folder")
    g.add_argument("--control_net_types", default=None,
                   help="conditioning maps that guide it, comma list of canny, depth (a union model: its modes; "
                        "a plain model: one; default the first of --controlnet_types)")
    g.add_argument("--control_net_weight", type=float, default=1.0, help="ControlNet conditioning scale")
    g = p.add_argument_group("LoRA")
    lora = g.add_mutually_exclusive_group()
    lora.add_argument("--lora_path", default=None, help="use this LoRA instead of training one")
    lora.add_argument("--skip_training", action="store_true", help="no LoRA at all")
    g.add_argument("--lora_multiplier", type=float, default=1.0)
    g.add_argument("--train_steps", type=int, default=20, help="LoRA training steps on the source images")
    g.add_argument("--train_lr", type=float, default=1e-4)
    g.add_argument("--train_dim", type=int, default=8, help="LoRA rank")
    g = p.add_argument_group("filtering")
    g.add_argument("--filter", dest="filter_spec", default=None, metavar="MODULE:FUNCTION",
                   help="detector callable: image -> [{bbox, label, score}]")
    g.add_argument("--yolo", nargs="?", const=DEFAULT_YOLO_WEIGHTS, default=None, metavar="WEIGHTS",
                   help=f"filter with ultralytics YOLO (optional package; weights default {DEFAULT_YOLO_WEIGHTS})")
    g.add_argument("--iou", type=float, default=0.5, help="IoU a detection needs to match a carried box")
    g.add_argument("--min_score", type=float, default=0.0, help="ignore detections scored below this")
    g = p.add_argument_group("output labels")
    g.add_argument("--yolo_labels", action="store_true",
                   help="also write labels/<name>.txt (class cx cy w h, normalised) and labels/classes.txt")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from library.synth.conditioning import parse_control_types
    from library.synth.pipeline import KEPT_FILE, SynthOptions, run

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = SynthOptions(
        predictions=args.predictions, output_dir=args.output_dir, model=args.model, num_samples=args.num_samples,
        images_root=args.images_root, steps=args.steps, resolution=args.resolution, scale=args.scale,
        sampler=args.sampler, negative_prompt=args.negative_prompt,
        controlnet_types=parse_control_types(args.controlnet_types), canny_thresholds=args.canny_thresholds,
        depth_model=args.depth_model, lora_path=args.lora_path, lora_multiplier=args.lora_multiplier,
        skip_training=args.skip_training, train_steps=args.train_steps, train_lr=args.train_lr,
        train_dim=args.train_dim, lllite_path=args.lllite_path, lllite_multiplier=args.lllite_multiplier,
        filter_spec=args.filter_spec, yolo=args.yolo, iou=args.iou, min_score=args.min_score,
        on_error=args.on_error, seed=args.seed, prompt_template=args.prompt_template, device=args.device,
        precision=args.precision, tokenizer_cache_dir=args.tokenizer_cache_dir, backend=args.backend, ae=args.ae,
        clip_l=args.clip_l, t5xxl=args.t5xxl, t5xxl_max_token_length=args.t5xxl_max_token_length,
        control_net_model=args.control_net_model, control_net_types=parse_control_types(args.control_net_types, "--control_net_types"),
        control_net_weight=args.control_net_weight, yolo_labels=args.yolo_labels)
    s = run(options)
    skipped = f", {len(s.skipped_records)} bad record(s) skipped" if s.skipped_records else ""
    print(f"{s.planned} sample(s): generated {s.generated}, reused {s.reused} from an earlier run; "
          f"kept {s.kept}, filtered out {s.filtered}{skipped}; records in "
          f"{os.path.join(args.output_dir, KEPT_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
