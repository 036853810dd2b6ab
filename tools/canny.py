"""Canny edge maps for ControlNet / ControlNet-LLLite conditioning images.

Grayscale (OpenCV's BGR->GRAY weights) then `cv2.Canny`, as sd-scripts' `tools/canny.py` makes the maps the
published canny LLLite models were trained on; white edges on black, 3 channels.

Folder mode (one map per image, same basename, `.png`):
    python tools/canny.py --input_dir imgs --output_dir canny [--threshold1 100 --threshold2 200]
    python tools/canny.py --input_dir imgs --output_dir canny --random_threshold --seed 0
Single image (sd-scripts' flags; its defaults 32/224 apply when no threshold is given):
    python tools/canny.py --input a.jpg --output a_canny.png [--thres1 32 --thres2 224]

The maps are made by library.data.control_maps (shared with tools/depth.py and dataset synthesis).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `library` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from library.data.control_maps import (  # noqa: E402
    FOLDER_DEFAULT_THRESHOLDS, RANDOM_THRESHOLD1, RANDOM_THRESHOLD2, SD_SCRIPTS_DEFAULT_THRESHOLDS, FolderReport,
    canny_image, convert_folder, random_thresholds, read_bgr, write_png,
)


def process_folder(
    input_dir: str,
    output_dir: str,
    thresholds: tuple[int, int] | None,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> FolderReport:
    """One edge map per image of `input_dir` (not recursive). `thresholds` None means random per image."""

    def convert(name: str, bgr: np.ndarray) -> np.ndarray:
        t1, t2 = thresholds if thresholds is not None else random_thresholds(seed, name)
        return canny_image(bgr, t1, t2, channel_order="bgr")

    return convert_folder(input_dir, output_dir, convert, write_png, "canny", overwrite, progress)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Canny edge maps (grayscale, then cv2.Canny; white edges on black) for LLLite/ControlNet.",
    )
    folder = parser.add_argument_group("folder mode")
    folder.add_argument("--input_dir", help="folder of images (not recursive)")
    folder.add_argument("--output_dir", help="folder for the maps: same basename, .png")
    folder.add_argument("--overwrite", action="store_true", help="redo maps that already exist (default: skip them)")
    folder.add_argument(
        "--random_threshold",
        action="store_true",
        help=f"draw thresholds per image: threshold1 in {RANDOM_THRESHOLD1}, threshold2 in {RANDOM_THRESHOLD2} "
        "(integers, ends included)",
    )
    folder.add_argument("--seed", type=int, default=None, help="seed for --random_threshold (per image: seed + name)")
    folder.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    single = parser.add_argument_group("single image (sd-scripts flags)")
    single.add_argument("--input", help="one input image")
    single.add_argument("--output", help="output path for --input")
    for name, alias, i in (("--threshold1", "--thres1", 0), ("--threshold2", "--thres2", 1)):
        parser.add_argument(
            name,
            alias,
            type=int,
            default=None,
            dest=name.lstrip("-"),
            help=f"Canny threshold (default {FOLDER_DEFAULT_THRESHOLDS[i]} in folder mode, "
            f"{SD_SCRIPTS_DEFAULT_THRESHOLDS[i]} with --input as in sd-scripts)",
        )
    return parser


def _thresholds(args: argparse.Namespace, defaults: tuple[int, int]) -> tuple[int, int]:
    t1 = args.threshold1 if args.threshold1 is not None else defaults[0]
    t2 = args.threshold2 if args.threshold2 is not None else defaults[1]
    return t1, t2


def main(argv: Sequence[str] | None = None) -> int:
    parser = setup_parser()
    args = parser.parse_args(argv)
    folder_mode = args.input_dir is not None or args.output_dir is not None
    single_mode = args.input is not None or args.output is not None
    if folder_mode == single_mode:
        parser.error("give either --input_dir and --output_dir, or --input and --output")

    if single_mode:
        if not (args.input and args.output):
            parser.error("--input and --output go together")
        if args.random_threshold:
            parser.error("--random_threshold is for folder mode")
        img = read_bgr(args.input)
        if img is None:
            print(f"error: cannot read image {args.input}", file=sys.stderr)
            return 1
        t1, t2 = _thresholds(args, SD_SCRIPTS_DEFAULT_THRESHOLDS)
        out_dir = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(out_dir, exist_ok=True)
        edges = canny_image(img, t1, t2, channel_order="bgr")
        ext = os.path.splitext(args.output)[1] or ".png"
        ok, buf = cv2.imencode(ext, edges)
        if not ok:
            print(f"error: cannot encode {args.output} (unknown extension {ext}?)", file=sys.stderr)
            return 1
        buf.tofile(args.output)
        print(f"wrote {args.output}")
        return 0

    if not (args.input_dir and args.output_dir):
        parser.error("--input_dir and --output_dir go together")
    if not os.path.isdir(args.input_dir):
        print(f"error: input folder not found: {args.input_dir}", file=sys.stderr)
        return 1
    if args.random_threshold and (args.threshold1 is not None or args.threshold2 is not None):
        parser.error("--random_threshold and fixed thresholds exclude each other")
    thresholds = None if args.random_threshold else _thresholds(args, FOLDER_DEFAULT_THRESHOLDS)
    report = process_folder(
        args.input_dir, args.output_dir, thresholds, args.seed, args.overwrite, progress=not args.no_progress
    )
    print(f"wrote {len(report.written)}, skipped {len(report.skipped)} existing, failed {len(report.failed)}")
    for src, reason in report.failed:
        print(f"error: {src}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
