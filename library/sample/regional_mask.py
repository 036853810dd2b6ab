"""Regional LoRA (`--mask_path` with `--network_weights`): each network acts only inside its region of a mask image.

Which region belongs to which network is sd-scripts' rule:
- by channel (default): network 1 takes the red channel, network 2 green, network 3 blue, as soft masks (value/255);
  networks from the 4th on act everywhere;
- by colour code (`--network_regional_mask_max_color_codes N`): network i (from 1) takes the pixels whose colour is
  exactly the low 3 bits of i, red = bit 0, green = bit 1, blue = bit 2 (1 red, 2 green, 3 yellow, 4 blue,
  5 magenta, 6 cyan, 7 white, 8 black); networks after the N-th act everywhere (N = 0: all of them).
A region that is empty (all zero) means "everywhere", as in sd-scripts. Only the first mask image is used.

How: the mask is resized (bilinear) to each U-Net resolution and multiplies the output of each of the network's
U-Net LoRA modules (`lora_up`), so the update is confined to the region at every layer: 4-D conv outputs by their
height and width, 3-D transformer outputs by their token count (one of the latent's resolutions). Time-embedding
modules (2-D outputs, no image position) act everywhere, as in sd-scripts.

sd-scripts additionally splits the prompt at " AND " and conditions each region on its own sub-prompt, with the
network's text-encoder and cross-attention key/value modules applied to that sub-prompt only. That split is not
available here: the whole prompt conditions every region, and those text-side modules (which act on the prompt, not on
a place in the image, so they cannot be confined to a region) are left out. Both are said once as warnings.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.config.environment_flags import warn_once
from library.errors import UserError

logger = logging.getLogger(__name__)

CHANNEL_REGIONS = 3  # without colour codes: the R, G and B channels are the regions of networks 1-3
LATENT_FACTOR = 8
LEVELS = 4  # U-Net resolutions below the latent's (SDXL uses 3; sd-scripts prepares 4)
TEXT_SIDE = ("attn2_to_k", "attn2_to_v")  # cross-attention modules whose input is the prompt


def region_of(rgb: np.ndarray, index: int, max_color_codes: int | None) -> np.ndarray:
    """The soft mask ([H, W] float32 in [0, 1]) of the index-th network (from 0) in an [H, W, 3] uint8 image."""
    if max_color_codes is not None:
        if index >= max_color_codes:
            return np.ones(rgb.shape[:2], np.float32)
        code = index + 1
        color = np.array([(code >> bit) & 1 for bit in range(3)], np.uint8) * 255
        mask = np.all(rgb == color, axis=2).astype(np.float32)
    elif index < CHANNEL_REGIONS:
        mask = rgb[:, :, index].astype(np.float32) / 255.0
    else:
        return np.ones(rgb.shape[:2], np.float32)
    return mask if mask.max() > 0 else np.ones_like(mask)  # an empty region means everywhere (sd-scripts)


def read_region_masks(path: str, count: int, max_color_codes: int | None) -> list[torch.Tensor]:
    """One mask per network from the first image at `path` (a file or a folder of images)."""
    from library.sample.generation import list_images

    first = list_images(path, "--mask_path")[0]
    try:
        with Image.open(first) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--mask_path: cannot read image '{first}': {exc}") from None
    if max_color_codes is not None and max_color_codes < 0:
        raise UserError(f"--network_regional_mask_max_color_codes must be 0 or more, got {max_color_codes}")
    return [torch.from_numpy(region_of(rgb, i, max_color_codes)) for i in range(count)]


def latent_resolutions(width: int, height: int) -> list[tuple[int, int]]:
    """(h, w) of every U-Net level for an image size, as sd-scripts lists them (odd sizes also rounded up)."""
    h, w = height // LATENT_FACTOR, width // LATENT_FACTOR
    sizes: list[tuple[int, int]] = []
    for _ in range(LEVELS):
        sizes.append((h, w))
        if h % 2 or w % 2:
            sizes.append((h + h % 2, w + w % 2))
        h, w = (h + 1) // 2, (w + 1) // 2
    return sizes


class RegionGate:
    """A forward hook on a module's `lora_up`: multiplies the update by the region, resized to the output's layout."""

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask  # [H, W]; None: the update is switched off (text-side modules)
        self.by_area: dict[int, tuple[int, int]] = {}
        self._cache: dict[tuple, torch.Tensor] = {}

    def set_size(self, width: int, height: int) -> None:
        self.by_area = {h * w: (h, w) for h, w in reversed(latent_resolutions(width, height))}

    def resized(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        key = (h, w, like.device, like.dtype)
        if key not in self._cache:
            m = F.interpolate(self.mask[None, None].float(), (h, w), mode="bilinear")
            self._cache[key] = m.to(like.device, like.dtype)
        return self._cache[key]

    def __call__(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return output * 0
        if output.dim() == 4:
            return output * self.resized(output.shape[2], output.shape[3], output)
        if output.dim() == 3:
            size = self.by_area.get(output.shape[1])
            if size is None:
                raise RuntimeError(f"regional mask: no U-Net resolution has {output.shape[1]} tokens")
            return output * self.resized(*size, output).reshape(1, -1, 1)
        return output  # time embedding: no position in the image


class RegionalNetworks:
    """The region gates of every hooked network; `set_size` before each pipeline call."""

    def __init__(self, networks: Sequence[Any], masks: Sequence[torch.Tensor]):
        self.gates: list[RegionGate] = []
        self.handles: list[Any] = []
        text_side = 0
        for network, mask in zip(networks, masks):
            if not hasattr(network, "unet_loras") or not all(hasattr(m, "lora_up") for m in network.unet_loras):
                raise UserError("--mask_path (regional networks) needs LoRA networks of networks.lora; "
                                f"{type(network).__name__} has no per-layer LoRA modules to confine")
            off = RegionGate(None)
            gate = RegionGate(mask)
            self.gates.append(gate)
            for lora in getattr(network, "text_encoder_loras", []):
                self.handles.append(lora.lora_up.register_forward_hook(off))
                text_side += 1
            for lora in network.unet_loras:
                side = any(part in lora.lora_name for part in TEXT_SIDE)
                text_side += side
                self.handles.append(lora.lora_up.register_forward_hook(off if side else gate))
        if text_side:
            warn_once([f"--mask_path: {text_side} text-encoder / cross-attention key-value LoRA module(s) act on the "
                       "prompt, not on a region, and are left out of the regional networks"])
        logger.info("regional networks: %d network(s) confined to their mask regions", len(self.gates))

    def set_size(self, width: int, height: int) -> None:
        for gate in self.gates:
            gate.set_size(width, height)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def check_regional(config: Any) -> None:
    """Before any model is loaded: the mask exists and the networks can be confined (a GenerationConfig)."""
    if config.network_regional_mask_max_color_codes is not None and config.network_regional_mask_max_color_codes < 0:
        raise UserError("--network_regional_mask_max_color_codes must be 0 or more, got "
                        f"{config.network_regional_mask_max_color_codes}")
    if not config.mask_path:
        if config.network_regional_mask_max_color_codes is not None:
            warn_once(["--network_regional_mask_max_color_codes has no effect without --mask_path"])
        return
    from library.sample.generation import list_images

    list_images(config.mask_path, "--mask_path")
    if not config.networks:  # sd-scripts' inpainting mask (library/sample/inpaint.py)
        if not config.image_path:
            raise UserError("--mask_path without --network_weights is an inpainting mask for img2img: give "
                            "--image_path too (or networks, to use the mask as their regions)")
        return
    if config.network_merge or config.network_merge_n_models:
        raise UserError("--mask_path (regional networks) cannot confine merged networks: drop --network_merge / "
                        "--network_merge_n_models")


def warn_sub_prompts(prompts: Sequence[str]) -> None:
    if any(" AND " in p for p in prompts):
        warn_once(["--mask_path: sd-scripts' per-region sub-prompts (' AND ') are not supported; the whole prompt "
                   "conditions every region"])


def attach_regions(networks: Sequence[Any], path: str, max_color_codes: int | None,
                   prompts: Sequence[str] = ()) -> RegionalNetworks:
    """Confine each hooked network to its region of the mask at `path`."""
    warn_sub_prompts(prompts)
    return RegionalNetworks(networks, read_region_masks(path, len(networks), max_color_codes))


__all__ = ["RegionGate", "RegionalNetworks", "attach_regions", "check_regional", "latent_resolutions", "read_region_masks",
           "region_of"]
