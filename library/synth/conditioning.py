"""Conditioning images made from each source image, at the generation size.

Canny uses `tools/canny.canny_image` (grayscale then cv2.Canny, as the published canny LLLite models expect).
Depth uses a local transformers depth-estimation folder (DPT, Depth Anything, GLPN, ...: anything that
`AutoModelForDepthEstimation` loads, with its image processor saved next to it); near is bright, as in the
depth maps ControlNet models were trained on.
"""
from __future__ import annotations

import os
from typing import Callable, Protocol

import numpy as np
from PIL import Image

from library.errors import ModelLoadError, UserError
from library.fileio import atomic_path
from tools.canny import canny_image

CONTROL_TYPES = ("canny", "depth")
DEFAULT_CANNY_THRESHOLDS = (100, 200)
SIZE_STEP = 32  # SDXL: 8x VAE and two U-Net downsamplings (also LLLite's deepest conditioning stride)


class ConditionMaker(Protocol):
    def __call__(self, image: Image.Image) -> Image.Image: ...


def parse_control_types(text: str | None, flag: str = "--controlnet_types") -> list[str]:
    if not text:
        return []
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in CONTROL_TYPES:
            raise UserError(f"{flag}: unknown type '{n}'; expected a comma list of "
                            f"{', '.join(CONTROL_TYPES)}")
    return list(dict.fromkeys(names))


def output_size(width: int, height: int, resolution: int, step: int = SIZE_STEP) -> tuple[int, int]:
    """Keep the source's aspect ratio at about resolution**2 pixels, both sides multiples of `step`."""
    if resolution < step or resolution % step:
        raise UserError(f"--resolution must be a positive multiple of {step}, got {resolution}")
    scale = (resolution * resolution / (width * height)) ** 0.5
    w = max(step, int(round(width * scale / step)) * step)
    h = max(step, int(round(height * scale / step)) * step)
    return w, h


def load_source(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image '{path}': {exc}") from None


def make_canny(thresholds: tuple[int, int] = DEFAULT_CANNY_THRESHOLDS) -> ConditionMaker:
    def canny(image: Image.Image) -> Image.Image:
        return Image.fromarray(canny_image(np.asarray(image.convert("RGB")), *thresholds))
    return canny


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


def build_makers(types: list[str], depth_model: str | None, canny_thresholds: tuple[int, int],
                 device: str = "cpu") -> dict[str, Callable[[Image.Image], Image.Image]]:
    makers: dict[str, Callable[[Image.Image], Image.Image]] = {}
    for t in types:
        if t == "canny":
            makers[t] = make_canny(canny_thresholds)
        elif t == "depth":
            if not depth_model:
                raise UserError("--controlnet_types depth needs --depth_model (a local transformers depth model "
                                "folder)")
            makers[t] = DepthEstimator(depth_model, device)
    return makers


def save_png_atomic(image: Image.Image, path: str) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp)
