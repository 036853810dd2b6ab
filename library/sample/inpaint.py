"""`--mask_path` without networks: sd-scripts' inpainting mask for img2img (`--image_path`).

White pixels are redrawn, black ones keep the init image: at every step the kept area is replaced by the init image's
latents noised to that step, as sd-scripts' SDXL pipeline does (diffusers' SDXL inpainting pipeline does the same
for a 4-channel U-Net). Masks are cycled over the images like the init images (image k takes mask k mod count) and
resized to the image size; diffusers rounds the mask to black or white at 0.5, where sd-scripts blends grey values.
With networks, the mask gives their regions instead (library/sample/regional_mask.py), as in sd-scripts.
"""
from __future__ import annotations

from typing import Any, Sequence

from PIL import Image

from library.errors import UserError


class InpaintMasks:
    """The mask files of --mask_path, one per image in turn."""

    def __init__(self, path: str):
        from library.sample.generation import list_images

        self.files = list_images(path, "--mask_path")

    def for_batch(self, indices: Sequence[int], size: tuple[int, int]) -> list[Image.Image]:
        """Grayscale masks at (width, height) for the images with these indices."""
        masks = []
        for k in indices:
            path = self.files[k % len(self.files)]
            try:
                with Image.open(path) as image:
                    mask = image.convert("L")
            except (OSError, ValueError) as exc:
                raise UserError(f"--mask_path: cannot read image '{path}': {exc}") from None
            masks.append(mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR))
        return masks


def inpaint_pipeline(pipe: Any) -> Any:
    """diffusers' SDXL inpainting pipeline on the components of the text-to-image pipeline (no weights copied)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    inpaint = StableDiffusionXLInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


__all__ = ["InpaintMasks", "inpaint_pipeline"]
