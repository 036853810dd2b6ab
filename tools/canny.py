"""Canny edge maps for ControlNet / ControlNet-LLLite conditioning images.

The published canny LLLite models were trained on maps made the way sd-scripts' `tools/canny.py` makes them:
grayscale (OpenCV's BGR->GRAY weights) then `cv2.Canny`. `canny_image` does exactly that and returns white edges on
black as a 3-channel image, which is what the conditioning-image loaders read.

Folder mode (one map per image, same basename, `.png`):
    python tools/canny.py --input_dir imgs --output_dir canny [--threshold1 100 --threshold2 200]
    python tools/canny.py --input_dir imgs --output_dir canny --random_threshold --seed 0
Single image (sd-scripts' flags; its defaults 32/224 apply when no threshold is given):
    python tools/canny.py --input a.jpg --output a_canny.png [--thres1 32 --thres2 224]

Importing this module has no side effects, so other code (e.g. synthesis pipelines) can use `canny_image`.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: make `library` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np

from library.fileio import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif")

FOLDER_DEFAULT_THRESHOLDS = (100, 200)
SD_SCRIPTS_DEFAULT_THRESHOLDS = (32, 224)  # sd-scripts' single-image defaults
# --random_threshold draws, per image, threshold1 uniformly from RANDOM_THRESHOLD1 and threshold2 from
# RANDOM_THRESHOLD2 (integers, both ends included); the ranges do not overlap, so threshold1 < threshold2.
RANDOM_THRESHOLD1 = (50, 150)
RANDOM_THRESHOLD2 = (151, 250)


def canny_image(image: np.ndarray, threshold1: float, threshold2: float, channel_order: str = "rgb") -> np.ndarray:
    """Edge map (H, W, 3) uint8, white edges on black, of an RGB (default) or BGR image.

    Grayscale or 4-channel input is accepted (alpha is dropped). Float input must be in [0, 1]. The channel order
    matters for the grayscale weights, so pass channel_order="bgr" for arrays read with OpenCV.
    """
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = np.round(arr * 255.0).astype(np.uint8)
        else:
            raise ValueError(f"expected a uint8 image or a float image in [0, 1], got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        gray = arr
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        code = {
            ("rgb", 3): cv2.COLOR_RGB2GRAY,
            ("bgr", 3): cv2.COLOR_BGR2GRAY,
            ("rgb", 4): cv2.COLOR_RGBA2GRAY,
            ("bgr", 4): cv2.COLOR_BGRA2GRAY,
        }[(channel_order, arr.shape[2])]
        gray = cv2.cvtColor(np.ascontiguousarray(arr), code)
    else:
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")
    edges = cv2.Canny(gray, threshold1, threshold2)
    return cv2.cvtColor(edges, cv2.COLOR_GRAY2BGR)  # gray -> 3 equal channels


def random_thresholds(seed: int | None, name: str) -> tuple[int, int]:
    """Thresholds for one image. With a seed they depend only on (seed, file name), so reruns, skipped files and a
    different processing order give every image the same thresholds."""
    rng = random.Random(f"{seed}:{name}") if seed is not None else random.Random()
    return rng.randint(*RANDOM_THRESHOLD1), rng.randint(*RANDOM_THRESHOLD2)


def read_bgr(path: str) -> np.ndarray | None:
    """BGR uint8 image, or None if it cannot be decoded. Reads bytes first so non-ASCII paths work everywhere, and
    falls back to Pillow (with HEIF/AVIF where pillow-heif is installed) for formats OpenCV lacks."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is not None:
        return img
    try:
        from PIL import Image

        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
        except ImportError:
            pass
        with Image.open(path) as pil:
            rgb = np.asarray(pil.convert("RGB"))
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    except Exception:
        return None


def write_png(path: str, image: np.ndarray) -> None:
    """Write atomically (temp + replace) so an interrupted run never leaves a half file that a rerun would skip."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode PNG for {path}")
    with atomic_path(path) as tmp:
        buf.tofile(tmp)


@dataclass
class FolderReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input path, reason)


def convert_folder(input_dir: str, output_dir: str, convert: Callable[[str, np.ndarray], np.ndarray],
                   write: Callable[[str, np.ndarray], None], desc: str, overwrite: bool = False,
                   progress: bool = True) -> FolderReport:
    """The folder loop every conditioning tool shares: one PNG per readable image of `input_dir` (not recursive),
    same basename, existing outputs skipped, name clashes and unreadable or unwritable files reported, not fatal.
    `convert(name, bgr)` makes the map; `write(path, map)` stores it."""
    from tqdm import tqdm

    names = sorted(n for n in os.listdir(input_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
    os.makedirs(output_dir, exist_ok=True)
    report = FolderReport()
    claimed: dict[str, str] = {}
    for name in tqdm(names, desc=desc, unit="img", disable=not progress):
        src = os.path.join(input_dir, name)
        out_name = os.path.splitext(name)[0] + ".png"
        if out_name in claimed:
            report.failed.append((src, f"output {out_name} is already made from {claimed[out_name]}"))
            continue
        claimed[out_name] = name
        dst = os.path.join(output_dir, out_name)
        if os.path.exists(dst) and not overwrite:
            report.skipped.append(src)
            continue
        img = read_bgr(src)
        if img is None:
            report.failed.append((src, "cannot read image"))
            continue
        try:
            write(dst, convert(name, img))
        except OSError as err:
            report.failed.append((src, f"cannot write {dst}: {err}"))
            continue
        report.written.append(dst)
    return report


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
