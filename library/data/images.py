"""Reading training images from disk and fitting them to a bucket.

Every image enters the pipeline through `load_image`, so orientation, transparency and format quirks are handled
once: EXIF orientation is applied (phones store portrait shots as rotated landscape pixels), transparent pixels are
composited on white (a black background would teach the model dark halos) unless the subset wants the alpha channel
as a loss mask, and HEIC/HEIF files from phones open like any other format.
"""
from __future__ import annotations

import logging
import random
import struct
import warnings
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from library.errors import UserError

try:  # HEIC/HEIF support is optional at import time so that the rest of the toolkit works without it.
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_AVAILABLE = True
except ImportError:  # pragma: no cover - the venv ships pillow-heif
    HEIF_AVAILABLE = False

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".heic", ".heif")
CropMode = Literal["center", "random"]

# EXIF orientations 5-8 rotate by 90 degrees, which swaps width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112

logger = logging.getLogger(__name__)


class ImageLoadError(UserError):
    """An image file cannot be read or decoded; the message names the file."""


# What a damaged or hostile file can make Pillow's decoders raise: truncation gives OSError or EOFError, broken
# headers ValueError, SyntaxError, struct.error or IndexError, odd modes TypeError. Caught only around decoding one
# user file, where each of them means "this file is bad".
_DECODE_ERRORS = (OSError, EOFError, UnidentifiedImageError, ValueError, SyntaxError, TypeError, IndexError,
                  ZeroDivisionError, struct.error)


def _bomb_error(path: str, e: Exception) -> ImageLoadError:
    return ImageLoadError(
        f"{path}: refused as a possible decompression bomb ({e}); if the image is genuine, downscale it (training "
        f"resizes every image to a bucket of at most max_bucket_reso anyway), or remove it from the dataset")


@dataclass
class LoadedImage:
    """Decoded pixels. `rgb` is uint8 HxWx3; `alpha` (float32 HxW in [0, 1]) is set only when asked for."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), the order PIL and the bucket code use."""
        return self.rgb.shape[1], self.rgb.shape[0]


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _to_rgba_or_rgb(img: Image.Image) -> Image.Image:
    """Bring any PIL mode (palette, grayscale, 16-bit, CMYK) to RGB or RGBA without losing transparency."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips instead of scaling, so scale to 8 bits by hand.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if _has_transparency(img):
        return img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str, alpha_mask: bool = False) -> LoadedImage:
    """Decode `path` to RGB uint8, upright. With `alpha_mask`, the alpha channel is returned as the loss mask and
    the colour channels are left as stored; without it, transparency is composited on white."""
    try:
        with warnings.catch_warnings():
            # image_size() already said so once, when the dataset was built; not again every epoch
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                img.load()
                img = _to_rgba_or_rgb(img)
    except Image.DecompressionBombError as e:
        raise _bomb_error(path, e) from None
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{path}: cannot decode image, the file may be truncated or damaged "
                             f"({type(e).__name__}: {e}); replace or remove it") from None
    if img.mode != "RGBA":
        rgb = np.asarray(img, dtype=np.uint8)
        alpha = np.ones(rgb.shape[:2], np.float32) if alpha_mask else None
        return LoadedImage(np.ascontiguousarray(rgb), alpha)
    rgba = np.asarray(img, dtype=np.uint8)
    alpha = rgba[:, :, 3].astype(np.float32) / 255.0
    if alpha_mask:
        return LoadedImage(np.ascontiguousarray(rgba[:, :, :3]), alpha)
    rgb = rgba[:, :, :3].astype(np.float32) * alpha[:, :, None] + 255.0 * (1.0 - alpha[:, :, None])
    return LoadedImage(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), None)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the upright image, read from the header only (no pixel decoding), so that bucketing a
    large dataset stays fast."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                try:
                    orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
                except Exception:  # a broken EXIF block must not hide an otherwise readable image
                    orientation = 1
    except Image.DecompressionBombError as e:
        raise _bomb_error(path, e) from None
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from None
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            logger.warning("%s: %dx%d pixels, above Pillow's decompression-bomb warning limit; decoding it costs "
                           "%.1f GB of memory each time it is loaded", path, width, height, width * height * 4 / 1e9)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


# resize_interpolation names (sd-scripts' choices) -> OpenCV filters
INTERPOLATIONS: dict[str, int] = {
    "lanczos": cv2.INTER_LANCZOS4, "nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA,
    "box": cv2.INTER_AREA,
}


def resize_image(arr: np.ndarray, size: tuple[int, int], interpolation_name: str | None = None) -> np.ndarray:
    """Resize HxW[xC] `arr` to `size` (width, height): by default area averaging when shrinking (no aliasing),
    Lanczos when enlarging (sharper than bilinear); a subset's resize_interpolation names another filter. Works for
    uint8 pixels and float32 masks alike."""
    h, w = arr.shape[:2]
    if (w, h) == tuple(size):
        return arr
    shrinking = size[0] * size[1] <= w * h
    if interpolation_name is not None:
        interpolation = INTERPOLATIONS[interpolation_name]
    else:
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    out = cv2.resize(arr, tuple(int(s) for s in size), interpolation=interpolation)
    if out.dtype == np.float32:  # Lanczos overshoots; keep masks in [0, 1]
        out = np.clip(out, 0.0, 1.0)
    return out


def choose_crop(resized_size: tuple[int, int], bucket: tuple[int, int], crop_mode: CropMode,
                rng: random.Random | None) -> tuple[int, int]:
    """(top, left) of the bucket-sized window inside an image of `resized_size` (width, height)."""
    extra_w, extra_h = resized_size[0] - bucket[0], resized_size[1] - bucket[1]
    if extra_w < 0 or extra_h < 0:
        raise ValueError(f"resized size {resized_size} does not cover bucket {bucket}")
    if crop_mode == "random":
        if rng is None:
            raise ValueError("random crop needs an rng")
        return rng.randint(0, extra_h), rng.randint(0, extra_w)
    return extra_h // 2, extra_w // 2


def crop_at(arr: np.ndarray, top_left: tuple[int, int], bucket: tuple[int, int]) -> np.ndarray:
    top, left = top_left
    return arr[top:top + bucket[1], left:left + bucket[0]]


def resize_and_crop(arr: np.ndarray, resized_size: tuple[int, int], bucket: tuple[int, int],
                    crop_mode: CropMode = "center", rng: random.Random | None = None
                    ) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize to `resized_size` (which covers the bucket) and cut out the bucket. Returns the pixels and the
    (top, left) crop offset in resized-image coordinates, the value SDXL's crop conditioning expects."""
    resized = resize_image(arr, resized_size)
    top_left = choose_crop(resized_size, bucket, crop_mode, rng)
    return np.ascontiguousarray(crop_at(resized, top_left, bucket)), top_left
