"""Score generated images of a trained subject against real photos of it: DINO, CLIP-I and CLIP-T.

    python tools/evaluate.py --generated_dir G --real_dir R --eval_dino_model M1 --eval_clip_model M2
        [--prompts FILE] [--rare_token sksToy] [--baseline_dir B] [--output eval.json]

Models are local transformers folders (with their image processor saved in them); nothing is downloaded. A metric
whose model is not given is reported as skipped, not as an error. See docs/evaluation.md for what the numbers mean.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import Sequence  # noqa: E402

from library.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Subject-fidelity metrics (DreamBooth paper): DINO, CLIP-I, CLIP-T.")
    p.add_argument("--generated_dir", required=True, help="folder of generated images (PNG prompt chunks are read)")
    p.add_argument("--real_dir", required=True, help="folder of real photos of the subject (HEIC/JPEG/PNG...)")
    p.add_argument("--eval_dino_model", default=None, help="local DINO/DINOv2 transformers folder (e.g. dino-vits16)")
    p.add_argument("--eval_clip_model", default=None, help="local CLIP transformers folder with its processor")
    p.add_argument("--prompts", default=None,
                   help="prompts file, one line per generated image in sorted file-name order "
                        "(default: each PNG's 'prompt' chunk)")
    p.add_argument("--rare_token", default=None, help="token removed from prompts before CLIP-T, e.g. sksToy")
    p.add_argument("--baseline_dir", default=None,
                   help="images of the base model (same prompts and seeds, LoRA multiplier 0): adds the LoRA's gain")
    p.add_argument("--baseline_prompts", default=None, help="prompts file for --baseline_dir (default: as --prompts)")
    p.add_argument("--output", default=None, help="write the JSON report here (atomically)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda when present), cpu, cuda, cuda:1...")
    p.add_argument("--batch_size", type=int, default=16, help="images or prompts per model call")
    p.add_argument("--quiet", action="store_true", help="print no summary (errors still go to stderr)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the flags say; returns the report (also the JSON written with --output)."""
    from library.eval.report import evaluate_folders, evaluate_with_baseline, write_report_json

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    common = dict(dino_model=args.eval_dino_model, clip_model=args.eval_clip_model, prompts=args.prompts,
                  rare_token=args.rare_token, device=args.device, batch_size=args.batch_size)
    if args.baseline_dir:
        report = evaluate_with_baseline(args.generated_dir, args.baseline_dir, args.real_dir,
                                        baseline_prompts=args.baseline_prompts, **common)
    else:
        if args.baseline_prompts:
            raise UserError("--baseline_prompts needs --baseline_dir")
        report = evaluate_folders(args.generated_dir, args.real_dir, **common)
    if args.output:
        write_report_json(report, args.output)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        report = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as e:  # e.g. out of memory, a corrupt weight file: one line too
        print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              file=sys.stderr)
        return 1
    if not args.quiet:
        from library.eval.report import format_summary

        print(format_summary(report))
        if args.output:
            print(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
