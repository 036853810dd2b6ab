"""sd-scripts' highres fix (``--highres_fix_scale`` and friends): draw the image small, upscale it, refine it.

Stage 1 runs each request at ``--highres_fix_scale`` times its size (rounded to a multiple of 32, as sd-scripts),
with ``--highres_fix_steps`` steps and its size/crop conditioning scaled alike. The result is upscaled to the
requested size, in latent space (bilinear, ``--highres_fix_latents_upscaling``) or as pixels (Lanczos), and stage 2
is img2img from it at the request's own steps and strength (``--t`` / ``--strength``, default 0.8) with the seed plus
one. ``--highres_fix_save_1st`` also writes the stage-1 images. Only the arithmetic lives here; the SDXL generator
runs the stages.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from library.errors import UserError
from library.sample.generation import DEFAULT_STRENGTH, SEED_RANGE, ImageRequest

STAGE1_MULTIPLE = 32


@dataclass(frozen=True)
class HighresFix:
    scale: float
    steps: int = 28
    strength: float | None = None  # stage 1 img2img strength (default: the request's)
    save_1st: bool = False
    latents_upscaling: bool = False
    disable_control_net: bool = False

    def check(self) -> None:
        if not 0 < self.scale:
            raise UserError(f"--highres_fix_scale must be above 0, got {self.scale}")
        if self.steps < 1:
            raise UserError(f"--highres_fix_steps must be at least 1, got {self.steps}")
        if self.strength is not None and not 0 <= self.strength <= 1:
            raise UserError(f"--highres_fix_strength must be between 0 and 1, got {self.strength}")

    def _scaled(self, value: int) -> int:
        return int(value * self.scale + 0.5)

    def stage1(self, req: ImageRequest) -> ImageRequest:
        """The small first pass of a request."""
        width = self._scaled(req.width) // STAGE1_MULTIPLE * STAGE1_MULTIPLE
        height = self._scaled(req.height) // STAGE1_MULTIPLE * STAGE1_MULTIPLE
        if width < STAGE1_MULTIPLE or height < STAGE1_MULTIPLE:
            raise UserError(f"--highres_fix_scale {self.scale:g}: the first pass of a {req.width}x{req.height} image "
                            f"would be {width}x{height}; it needs at least {STAGE1_MULTIPLE} pixels a side")
        negative = req.negative_original_size
        return replace(
            req, width=width, height=height, steps=self.steps,
            original_size=(self._scaled(req.original_size[0]), self._scaled(req.original_size[1])),
            negative_original_size=None if negative is None else (self._scaled(negative[0]),
                                                                  self._scaled(negative[1])),
            crop=(self._scaled(req.crop[0]), self._scaled(req.crop[1])),
            strength=(self.strength if self.strength is not None else req.strength) if req.init_image else None)

    def stage2(self, req: ImageRequest, default_strength: float | None) -> ImageRequest:
        """The refining pass: img2img from the upscaled first pass, seed + 1 (as sd-scripts)."""
        strength = req.strength if req.strength is not None else (
            default_strength if default_strength is not None else DEFAULT_STRENGTH)
        return replace(req, seed=(req.seed + 1) % SEED_RANGE, strength=strength)

    def record(self) -> dict[str, str]:
        """PNG metadata of the final images."""
        info = {"highres_fix_scale": f"{self.scale:g}", "highres_fix_steps": str(self.steps),
                "highres_fix_upscaling": "latents" if self.latents_upscaling else "lanczos"}
        if self.strength is not None:
            info["highres_fix_strength"] = f"{self.strength:g}"
        return info


def upscale_latents(latents: torch.Tensor, width: int, height: int, factor: int = 8) -> torch.Tensor:
    """Bilinear latent upscaling to the final size (interpolate has no bfloat16 kernel everywhere: go via float)."""
    up = torch.nn.functional.interpolate(latents.float(), (height // factor, width // factor), mode="bilinear")
    return up.to(latents.dtype)


__all__ = ["HighresFix", "upscale_latents"]
