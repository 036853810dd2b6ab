"""Aspect-ratio buckets computed exactly as sd-scripts' BucketManager does.

Users move datasets between trainers and expect the same training shapes (and the same latent caches), so the
candidate list, the nearest-aspect choice (first candidate wins a tie, as numpy's argmin) and the rounding of
`bucket_no_upscale` follow sd-scripts' `make_bucket_resolutions` and `BucketManager.select_bucket` step by step.
All sizes are (width, height).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from library.data.types import DatasetConfig
from library.errors import UserError


# sd-scripts resizes an image until it covers its bucket and crops the rest, whatever the rest is. For an image far
# more elongated than any bucket that resized copy is huge (a 40000x1 strip covering a 1024x256 bucket becomes
# 10240000x256 pixels, 7.9 GB) and nearly all of it is cropped away, so such images are refused up front. 16 leaves
# every sane image through: with default buckets (aspect up to 4:1) images up to 64:1, without bucketing 16:1.
MAX_RESIZED_AREA_FACTOR = 16


class BucketError(UserError):
    """An image cannot be put in any bucket (e.g. smaller than one bucket step with bucket_no_upscale)."""


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """Candidate buckets: the square of the max area, then for every width from min_size to max_size in steps of
    `divisible`, the tallest height (a multiple of `divisible`, capped at max_size) whose area fits; both
    orientations. Sorted."""
    return list(_bucket_resolutions(tuple(max_reso), min_size, max_size, divisible))


@lru_cache(maxsize=64)
def _bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int, divisible: int) -> tuple:
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return tuple(sorted(resos))


@dataclass(frozen=True)
class BucketSpec:
    """The bucket settings of one dataset."""

    resolution: tuple[int, int]
    enable_bucket: bool = False
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = False

    @classmethod
    def from_dataset(cls, d: DatasetConfig) -> "BucketSpec":
        return cls(
            resolution=tuple(d.resolution),
            enable_bucket=d.enable_bucket,
            min_reso=d.min_bucket_reso,
            max_reso=d.max_bucket_reso,
            step=d.bucket_reso_steps,
            no_upscale=d.bucket_no_upscale,
        )

    def candidates(self) -> list[tuple[int, int]]:
        """The predefined buckets (one fixed bucket without bucketing; none with no_upscale, which derives them)."""
        if not self.enable_bucket:
            return [tuple(self.resolution)]
        if self.no_upscale:
            return []
        return make_bucket_resolutions(self.resolution, self.min_reso, self.max_reso, self.step)


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: resize to `resized_size` (which covers `bucket`), then crop to `bucket`."""

    bucket: tuple[int, int]
    resized_size: tuple[int, int]
    ar_error: float = 0.0  # bucket aspect - image aspect, as sd-scripts logs it


def assign_bucket(spec: BucketSpec, image_size: tuple[int, int]) -> BucketAssignment:
    width, height = image_size
    if width <= 0 or height <= 0:
        raise BucketError(f"image size {image_size} is not positive")
    aspect = width / height
    if spec.enable_bucket and spec.no_upscale:
        bucket, resized = _no_upscale_bucket(spec, width, height, aspect)
    else:
        bucket = _nearest_bucket(tuple(spec.candidates()), width, height, aspect)
        if aspect > bucket[0] / bucket[1]:  # wider than the bucket: match heights, crop the sides
            scale = bucket[1] / height
        else:
            scale = bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        _check_not_extreme((width, height), bucket, resized)
    return BucketAssignment(bucket=bucket, resized_size=resized, ar_error=bucket[0] / bucket[1] - aspect)


def _check_not_extreme(size: tuple[int, int], bucket: tuple[int, int], resized: tuple[int, int]) -> None:
    """Refuse, before any pixel is allocated, an image whose resized copy would dwarf its bucket."""
    factor = (resized[0] * resized[1]) / (bucket[0] * bucket[1])
    if factor > MAX_RESIZED_AREA_FACTOR:
        kept = 100.0 / factor
        raise BucketError(
            f"image {size[0]}x{size[1]} is too elongated for bucket {bucket[0]}x{bucket[1]}: it would be resized to "
            f"{resized[0]}x{resized[1]} and only {kept:.2g}% of it trained on; crop it to a less extreme aspect "
            f"ratio or remove it (the resized image may be at most {MAX_RESIZED_AREA_FACTOR}x the bucket's area)")


def _nearest_bucket(candidates: tuple, width: int, height: int, aspect: float) -> tuple[int, int]:
    if (width, height) in candidates:  # an exact bucket wins even against an equal-aspect neighbour
        return (width, height)
    best, best_err = candidates[0], abs(candidates[0][0] / candidates[0][1] - aspect)
    for reso in candidates[1:]:
        err = abs(reso[0] / reso[1] - aspect)
        if err < best_err:
            best, best_err = reso, err
    return best


def _no_upscale_bucket(spec: BucketSpec, width: int, height: int, aspect: float):
    """Shrink only: images above the max area are scaled down to it (rounding whichever side keeps the aspect
    closer), then the bucket is the resized size rounded down to the step."""
    step = spec.step
    max_area = spec.resolution[0] * spec.resolution[1]

    def round_to_steps(x: float) -> int:
        x = int(x + 0.5)
        return x - x % step

    if width * height > max_area:
        resized_w = math.sqrt(max_area * aspect)
        resized_h = max_area / resized_w
        w_rounded = round_to_steps(resized_w)
        h_for_w = round_to_steps(w_rounded / aspect)
        h_rounded = round_to_steps(resized_h)
        w_for_h = round_to_steps(h_rounded * aspect)
        if h_for_w <= 0 or h_rounded <= 0:
            raise BucketError(f"image {width}x{height} is too thin to fit bucket_reso_steps {step}")
        if abs(w_rounded / h_for_w - aspect) < abs(w_for_h / h_rounded - aspect):
            resized = (w_rounded, int(w_rounded / aspect + 0.5))
        else:
            resized = (int(h_rounded * aspect + 0.5), h_rounded)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if bucket[0] <= 0 or bucket[1] <= 0:
        raise BucketError(
            f"image {width}x{height} has a side shorter than bucket_reso_steps ({step}); with bucket_no_upscale "
            "it cannot be enlarged: remove it or lower bucket_reso_steps"
        )
    return bucket, resized


def bucket_histogram(assignments: Iterable[BucketAssignment]) -> list[tuple[tuple[int, int], int]]:
    """(bucket, number of images) sorted by bucket, as sd-scripts prints its bucket table (without repeats)."""
    counts = Counter(a.bucket for a in assignments)
    return sorted(counts.items())
