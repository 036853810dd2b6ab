"""Depth maps for ControlNet conditioning, with a local transformers depth-estimation model folder (DPT, Depth
Anything, GLPN, ...: anything `AutoModelForDepthEstimation` loads, with its image processor saved beside it).

Maps are grayscale as RGB, at the input's size, normalised per image, near is bright (as ControlNet depth models
were trained). The model is the one `tools/synthesize.py --depth_model` uses (library.data.control_maps'
DepthEstimator), so maps made here and there agree.

    python tools/depth.py --input_dir imgs --output_dir depth --model models/dpt-hybrid [--overwrite] [--device cuda]

Same folder conventions as tools/canny.py: one `<basename>.png` per image (not recursive), existing maps skipped
unless --overwrite, unreadable inputs reported by name at the end (exit 1).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `library` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402
from library.data.control_maps import FolderReport, convert_folder  # noqa: E402


def process_folder(input_dir: str, output_dir: str, estimate: Callable, overwrite: bool = False,
                   progress: bool = True) -> FolderReport:
    """One depth map per image of `input_dir`; `estimate` maps an RGB PIL image to the map (a DepthEstimator)."""
    import cv2
    from PIL import Image

    from library.data.control_maps import save_png_atomic

    def convert(name: str, bgr):
        return estimate(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))

    return convert_folder(input_dir, output_dir, convert, lambda path, depth: save_png_atomic(depth, path), "depth",
                          overwrite, progress)


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", required=True, help="folder of images (not recursive)")
    p.add_argument("--output_dir", required=True, help="folder for the maps: same basename, .png")
    p.add_argument("--model", required=True, help="local transformers depth-estimation model folder")
    p.add_argument("--overwrite", action="store_true", help="redo maps that already exist (default: skip them)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from library.data.control_maps import DepthEstimator
    from library.errors import UserError

    args = setup_parser().parse_args(argv)
    if not os.path.isdir(args.input_dir):
        raise UserError(f"--input_dir '{args.input_dir}': no such folder")
    estimator = DepthEstimator(args.model, args.device, "--model")
    report = process_folder(args.input_dir, args.output_dir, estimator, args.overwrite, not args.no_progress)
    print(f"wrote {len(report.written)}, skipped {len(report.skipped)} existing, failed {len(report.failed)}")
    for src, reason in report.failed:
        print(f"error: {src}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
