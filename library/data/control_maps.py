"""Control maps (conditioning images) from photos: Canny edges and depth, one image or a whole folder.

The canny tool, the depth tool and dataset synthesis (library/synth) make their maps here, so a map made by either
tool equals the one synthesis makes for the same image and settings.

Canny: the published canny LLLite models were trained on maps made the way sd-scripts' `tools/canny.py` makes them:
grayscale (OpenCV's BGR->GRAY weights) then `cv2.Canny`. `canny_image` does exactly that and returns white edges on
black as a 3-channel image, which is what the conditioning-image loaders read.

Depth: a local transformers depth-estimation folder (DPT, Depth Anything, GLPN, ...: anything that
`AutoModelForDepthEstimation` loads, with its image processor saved next to it); near is bright, as in the depth
maps ControlNet models were trained on.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from library.errors import ModelLoadError
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


class DepthEstimator:
    """A transformers depth model from a local folder; loaded once, used for every source image."""

    def __init__(self, folder: str, device: str = "cpu", flag: str = "--depth_model"):
        if not os.path.isdir(folder):
            raise ModelLoadError(f"{flag} '{folder}': no such folder (a transformers depth model folder)")
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        try:
            self.processor = AutoImageProcessor.from_pretrained(folder)
            self.model = AutoModelForDepthEstimation.from_pretrained(folder).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{flag} '{folder}': cannot load a depth model and its image processor "
                                 f"({exc})") from None
        self.device = device
        self._torch = torch

    def __call__(self, image: Image.Image) -> Image.Image:
        torch = self._torch
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with torch.no_grad():
            depth = self.model(**inputs).predicted_depth  # [1, h, w], larger = nearer for relative models
        depth = torch.nn.functional.interpolate(depth[:, None].float(), size=(image.height, image.width),
                                                mode="bicubic", align_corners=False)[0, 0]
        lo, hi = depth.min(), depth.max()
        norm = (depth - lo) / (hi - lo) if hi > lo else torch.zeros_like(depth)
        gray = (norm * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        return Image.fromarray(np.stack([gray] * 3, axis=-1))


def save_png_atomic(image: Image.Image, path: str) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp)
