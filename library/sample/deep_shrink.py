"""Deep Shrink (sd-scripts' `--ds_depth_1` ... `--ds_ratio`, prompt options `--dsd1 --dst1 --dsd2 --dst2 --dsr`).

While the timestep is high (early denoising: composition is decided), the U-Net's hidden states are shrunk by
`ratio` at one input depth, so the deep blocks see a smaller image and draw one subject instead of repeating it at
sizes the model was not trained on; where the output side joins a full-size skip connection, the hidden states are
scaled back to the skip's size. Later steps run the U-Net unchanged and add the detail.

Depths follow sd-scripts' `input_blocks` of its own SDXL U-Net (0 to 8): 0 is the input convolution, then each
down block's layers (resnet plus attention) in order and its downsampler. In diffusers' `UNet2DConditionModel` those
are `conv_in`, `down_blocks[i].resnets[j]` and `down_blocks[i].downsamplers[0]`; shrinking "at depth d" resizes the
input of that module (bicubic, `scale_factor=ratio`, align_corners False, as sd-scripts). Depth 1 applies while
t >= timesteps_1; depth 2 while timesteps_2 <= t < timesteps_1. Back up, before every concatenation with a skip
state of another size, the hidden states are resized to it (bicubic); before the output convolution, to the input.

Everything is done with hooks on diffusers' modules, installed only for a pipeline call that uses Deep Shrink
(`deep_shrink_hooks`), so a run without it runs the very same U-Net code.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from library.errors import UserError

SDXL_MAX_DEPTH = 8  # sd-scripts' SDXL U-Net has 9 input blocks
DEFAULT_DEPTH = 3  # what a prompt's --dst1/--dsd2/--dst2/--dsr enable when no depth 1 is given anywhere


@dataclass(frozen=True)
class DeepShrink:
    """The command line's Deep Shrink settings; `depth_1` None means off (sd-scripts' defaults otherwise)."""

    depth_1: int | None = None
    timesteps_1: int = 650
    depth_2: int | None = None
    timesteps_2: int | None = 650
    ratio: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.depth_1 is not None

    def depth_at(self, timestep: float) -> int | None:
        """The input depth to shrink at this timestep, or None (sd-scripts' test: t >= timesteps_1 for depth 1;
        timesteps_2 <= t < timesteps_1 for depth 2; timesteps_2 None means 1000)."""
        if self.depth_1 is None:
            return None
        if timestep >= self.timesteps_1:
            return self.depth_1
        low = self.timesteps_2 if self.timesteps_2 is not None else 1000
        if self.depth_2 is not None and timestep >= low:
            return self.depth_2
        return None

    def check(self, where: str = "", max_depth: int = SDXL_MAX_DEPTH) -> None:
        """Values that cannot work; `where` names the prompt line for per-prompt values."""
        prefix = f"{where}: " if where else ""
        for name, depth in (("--ds_depth_1 (--dsd1)", self.depth_1), ("--ds_depth_2 (--dsd2)", self.depth_2)):
            if depth is not None and not 0 <= depth <= max_depth:
                raise UserError(f"{prefix}{name} must be between 0 and {max_depth} (an input depth of the U-Net), "
                                f"got {depth}")
        if self.enabled and not (math.isfinite(self.ratio) and self.ratio > 0):
            raise UserError(f"{prefix}--ds_ratio (--dsr) must be a number above 0, got {self.ratio}")

    def describe(self) -> str:
        """For the PNG metadata: depth/timesteps of both stages and the ratio."""
        return (f"depth {self.depth_1}/{self.depth_2}, timesteps {self.timesteps_1}/{self.timesteps_2}, "
                f"ratio {self.ratio:g}")


def resolve(base: DeepShrink | None, spec: Any) -> DeepShrink | None:
    """The settings for one prompt line, as sd-scripts reads them: any of --dsd1 --dst1 --dsd2 --dst2 --dsr turns
    Deep Shrink on for the line (depth 1 from --dsd1, else --ds_depth_1, else 3), the others fall back to the
    command line. None: off."""
    base = base or DeepShrink()
    given = {name: getattr(spec, name, None) for name in ("ds_depth_1", "ds_timesteps_1", "ds_depth_2",
                                                          "ds_timesteps_2", "ds_ratio")}
    if all(v is None for v in given.values()):
        return base if base.enabled else None

    def pick(name: str, default: Any) -> Any:
        return given[name] if given[name] is not None else default

    depth_1 = given["ds_depth_1"]
    if depth_1 is None:
        depth_1 = base.depth_1 if base.depth_1 is not None else DEFAULT_DEPTH
    return DeepShrink(depth_1, pick("ds_timesteps_1", base.timesteps_1), pick("ds_depth_2", base.depth_2),
                      pick("ds_timesteps_2", base.timesteps_2), pick("ds_ratio", base.ratio))


def input_depth_modules(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """diffusers' modules at sd-scripts' input depths 0..8: conv_in, each down block's resnets, its downsampler."""
    modules: list[torch.nn.Module] = [unet.conv_in]
    for block in unet.down_blocks:
        modules.extend(block.resnets)
        if getattr(block, "downsamplers", None):
            modules.append(block.downsamplers[0])
    return modules


def _to_float_for_resize(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    # bicubic interpolation has no bfloat16 kernel on every device; sd-scripts goes through float32 for it
    return (x.float() if x.dtype == torch.bfloat16 else x), x.dtype


def shrink(x: torch.Tensor, ratio: float) -> torch.Tensor:
    y, dtype = _to_float_for_resize(x)
    return F.interpolate(y, scale_factor=ratio, mode="bicubic", align_corners=False).to(dtype)


def resize_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """`x` at spatial `size` (bicubic); unchanged when it already has it."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y, dtype = _to_float_for_resize(x)
    return F.interpolate(y, size=tuple(size), mode="bicubic", align_corners=False).to(dtype)


def _replace_first(args: tuple, kwargs: dict, names: tuple[str, ...], fn) -> tuple[tuple, dict]:
    """Apply `fn` to a module's first input, given positionally or by one of `names`."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    for name in names:
        if name in kwargs:
            return args, {**kwargs, name: fn(kwargs[name])}
    return args, kwargs


class _Hooks:
    """The hooks of one Deep Shrink setting on one U-Net, and the per-call state they share."""

    def __init__(self, unet: torch.nn.Module, settings: DeepShrink):
        self.settings = settings
        self.depth: int | None = None  # the depth to shrink during the current U-Net call
        self.sample_size: tuple[int, int] | None = None
        self.skips: dict[int, list[tuple[int, int]]] = {}  # up block -> skip sizes in the order they are joined
        modules = input_depth_modules(unet)
        settings.check(max_depth=len(modules) - 1)
        self.handles = [unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)]
        for depth, module in enumerate(modules):
            self.handles.append(module.register_forward_pre_hook(self._shrinker(depth), with_kwargs=True))
        for b, block in enumerate(unet.up_blocks):
            self.handles.append(block.register_forward_pre_hook(self._on_up_block(b), with_kwargs=True))
            layers = getattr(block, "attentions", None) or block.resnets
            for k, layer in enumerate(layers):
                self.handles.append(layer.register_forward_hook(self._after_up_layer(b, k)))
        last = unet.conv_norm_out if getattr(unet, "conv_norm_out", None) is not None else unet.conv_out
        self.handles.append(last.register_forward_pre_hook(self._before_out, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        self.depth = self.settings.depth_at(value)
        self.sample_size = tuple(sample.shape[-2:])
        return None

    def _shrinker(self, depth: int):
        def hook(module, args, kwargs):
            if self.depth != depth:
                return None
            return _replace_first(args, kwargs, ("hidden_states", "input_tensor", "input", "sample"),
                                  lambda x: shrink(x, self.settings.ratio))
        return hook

    def _on_up_block(self, b: int):
        def hook(module, args, kwargs):
            skips = kwargs["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kwargs else args[1]
            self.skips[b] = [tuple(s.shape[-2:]) for s in reversed(skips)]
            target = self.skips[b][0]
            return _replace_first(args, kwargs, ("hidden_states",), lambda x: resize_to(x, target))
        return hook

    def _after_up_layer(self, b: int, k: int):
        def hook(module, args, output):
            sizes = self.skips.get(b, [])
            if k + 1 >= len(sizes):
                return None  # the block's last layer: its upsampler (or the output) follows
            target = sizes[k + 1]
            if isinstance(output, tuple):
                return (resize_to(output[0], target), *output[1:])
            if hasattr(output, "sample"):
                output.sample = resize_to(output.sample, target)
                return output
            return resize_to(output, target)
        return hook

    def _before_out(self, module, args, kwargs):
        size = self.sample_size
        return None if size is None else _replace_first(args, kwargs, ("input", "hidden_states"),
                                                        lambda x: resize_to(x, size))


@contextlib.contextmanager
def deep_shrink_hooks(unet: torch.nn.Module, settings: DeepShrink | None) -> Iterator[None]:
    """Deep Shrink on `unet` for the duration of the block; with None (or depth 1 None) nothing is hooked."""
    if settings is None or not settings.enabled:
        yield
        return
    hooks = _Hooks(unet, settings)
    try:
        yield
    finally:
        hooks.remove()


__all__ = ["DeepShrink", "deep_shrink_hooks", "input_depth_modules", "resolve"]
