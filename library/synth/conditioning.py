"""Conditioning images made from each source image, at the generation size.

The maps themselves (Canny: grayscale then cv2.Canny, as the published canny LLLite models expect; depth: a local
transformers depth model, near is bright) are library.data.control_maps', which tools/canny.py and tools/depth.py
use too; this module picks the makers for --controlnet_types and sizes the synthesis images.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
from PIL import Image

from library.data.control_maps import DepthEstimator, canny_image
from library.errors import UserError

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

