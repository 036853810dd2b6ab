"""Synthetic degradations that turn a clean target into the control image of a restoration (Kontext-style) pair.

`--kontext_degrade "downsample=4,noise=0.05,blur=1.5,jpeg=30"` names the steps; they always run in the order
blur -> downsample -> noise -> jpeg (optics, then sensor resolution, sensor noise, then compression), whatever
the order in the string. Images are float tensors [B, 3, H, W] in [0, 1]; randomness (the noise) comes from the
caller's generator, so a training step's control image is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.errors import ConfigError

DEGRADE_KEYS = ("downsample", "noise", "blur", "jpeg")
_FLAG = "--kontext_degrade"


@dataclass(frozen=True)
class DegradeSpec:
    downsample: int = 1  # integer factor: area-downsample, then bilinear upsample back to the size
    noise: float = 0.0  # std of additive gaussian noise, in [0, 1] pixel units
    blur: float = 0.0  # gaussian sigma in pixels
    jpeg: int | None = None  # JPEG quality 1..100

    @property
    def is_identity(self) -> bool:
        return self.downsample == 1 and self.noise == 0 and self.blur == 0 and self.jpeg is None


def parse_degrade_spec(text: str) -> DegradeSpec:
    """Parse `key=value,...`; every error names the flag and the key."""
    values: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}", table=_FLAG)
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in DEGRADE_KEYS:
            raise ConfigError(f"unknown degradation; known: {', '.join(DEGRADE_KEYS)}", table=_FLAG, key=key)
        try:
            values[key] = float(raw)
        except ValueError:
            raise ConfigError(f"expected a number, got {raw!r}", table=_FLAG, key=key) from None
    ds = values.get("downsample", 1.0)
    if ds < 1 or ds != int(ds):
        raise ConfigError(f"expected an integer factor >= 1, got {ds:g}", table=_FLAG, key="downsample")
    for key in ("noise", "blur"):
        if values.get(key, 0.0) < 0:
            raise ConfigError(f"expected a value >= 0, got {values[key]:g}", table=_FLAG, key=key)
    jpeg = values.get("jpeg")
    if jpeg is not None and not (1 <= jpeg <= 100 and jpeg == int(jpeg)):
        raise ConfigError(f"expected a quality from 1 to 100, got {jpeg:g}", table=_FLAG, key="jpeg")
    return DegradeSpec(downsample=int(ds), noise=values.get("noise", 0.0), blur=values.get("blur", 0.0),
                       jpeg=int(jpeg) if jpeg is not None else None)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur (radius 3 sigma) with reflected borders."""
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c = images.shape[1]
    pad_h = min(radius, images.shape[-1] - 1)
    pad_v = min(radius, images.shape[-2] - 1)
    k = kernel[radius - pad_h: radius + pad_h + 1]
    horizontal = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    out = F.conv2d(F.pad(images, (pad_h, pad_h, 0, 0), mode="reflect"), horizontal, groups=c)
    k = kernel[radius - pad_v: radius + pad_v + 1]
    vertical = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    return F.conv2d(F.pad(out, (0, 0, pad_v, pad_v), mode="reflect"), vertical, groups=c)


def downsample_up(images: torch.Tensor, factor: int) -> torch.Tensor:
    if factor <= 1:
        return images
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, h // factor), max(1, w // factor)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def add_noise(images: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    if std <= 0:
        return images
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32).to(images.device, images.dtype)
    return images + noise * std


def jpeg_roundtrip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode each image as JPEG at `quality` (OpenCV), back to a float tensor."""
    import cv2
    import numpy as np

    out = []
    for img in images:
        arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().float().numpy() * 255.0).round().astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", arr[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("OpenCV could not encode a JPEG")
        dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32) / 255.0
        out.append(torch.from_numpy(np.ascontiguousarray(dec)).permute(2, 0, 1))
    return torch.stack(out).to(images.device, images.dtype)


def degrade(images: torch.Tensor, spec: DegradeSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the spec's steps to [B, 3, H, W] images in [0, 1]; the result is clamped to [0, 1]."""
    out = gaussian_blur(images, spec.blur)
    out = downsample_up(out, spec.downsample)
    out = add_noise(out, spec.noise, generator)
    out = out.clamp(0, 1)
    if spec.jpeg is not None:
        out = jpeg_roundtrip(out, spec.jpeg)
    return out
