"""Gradual latent (sd-scripts' `--gradual_latent_*`, prompt options `--glt --glr --gls --gle --glsn --glus`).

Denoising starts on latents shrunk to `ratio` of their size (bicubic), so the composition is drawn at a size the
model knows; once the timestep falls below `start_timesteps`, every `every_n_steps` steps the latents are enlarged
by `ratio_step` (bicubic, sides rounded down to a multiple of 8 latent pixels, as sd-scripts does) until they are
back to full size. An optional unsharp mask ("ksize,sigma,strength[,target_x]") sharpens each enlargement.

As in sd-scripts this is part of the Euler a sampler's step (its `EulerAncestralDiscreteSchedulerGL`): the
enlargement happens inside the step, on the denoised estimate (`target_x`, the default) or on the sample and its
derivative, and the step's fresh noise is drawn at the new size, scaled by `s_noise`. Other samplers ignore it with
a warning, as sd-scripts does. Here the initial shrink is done by the same scheduler at the first step, so text to
image, img2img and the highres-fix passes all use it without pipeline changes. If the steps end before the ratio
reaches 1, the image is smaller than asked (as in sd-scripts).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from library.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = 650  # what a prompt's --glr/--gle/--gls/--glsn/--glus enable without --glt or the flag
SUPPORTED_SAMPLERS = ("euler_a",)  # canonical names (k_euler_a is an alias)


@dataclass(frozen=True)
class Unsharp:
    ksize: int
    sigma: float
    strength: float
    target_x: bool = True


def parse_unsharp(text: str | None, where: str = "--gradual_latent_unsharp_params") -> Unsharp | None:
    """sd-scripts' "ksize,sigma,strength[,target_x]" (e.g. 3,0.5,0.5,1); None or "" means no unsharp mask."""
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    usage = "expected ksize,sigma,strength[,target_x], e.g. 3,0.5,0.5,1"
    if not 3 <= len(parts) <= 4:
        raise UserError(f"{where} '{text}': {usage}")
    try:
        ksize_f, sigma, strength = (float(p) for p in parts[:3])
        target_x = True if len(parts) == 3 else bool(int(parts[3]))
    except ValueError:
        raise UserError(f"{where} '{text}': {usage}") from None
    ksize = int(ksize_f)
    if ksize < 1 or ksize % 2 == 0:
        raise UserError(f"{where} '{text}': ksize must be a positive odd number, got {parts[0]}")
    if not (math.isfinite(sigma) and sigma > 0) or not math.isfinite(strength):
        raise UserError(f"{where} '{text}': sigma must be above 0 and strength a finite number")
    return Unsharp(ksize, sigma, strength, target_x)


@dataclass(frozen=True)
class GradualLatent:
    """The command line's settings; `timesteps` None means off (sd-scripts' defaults otherwise)."""

    timesteps: int | None = None
    ratio: float = 0.5
    ratio_step: float = 0.125
    every_n_steps: int = 3
    s_noise: float = 1.0
    unsharp: Unsharp | None = None

    @property
    def enabled(self) -> bool:
        return self.timesteps is not None

    def check(self, where: str = "") -> None:
        prefix = f"{where}: " if where else ""
        if not self.enabled:
            return
        if not (math.isfinite(self.ratio) and 0 < self.ratio <= 1):
            raise UserError(f"{prefix}--gradual_latent_ratio (--glr) must be above 0 and at most 1, got {self.ratio}")
        if not (math.isfinite(self.ratio_step) and self.ratio_step > 0):
            raise UserError(f"{prefix}--gradual_latent_ratio_step (--gls) must be above 0, got {self.ratio_step}")
        if self.every_n_steps < 1:
            raise UserError(f"{prefix}--gradual_latent_every_n_steps (--gle) must be at least 1, "
                            f"got {self.every_n_steps}")
        if not math.isfinite(self.s_noise):
            raise UserError(f"{prefix}--gradual_latent_s_noise (--glsn) must be a finite number")

    def describe(self) -> str:
        text = (f"timesteps {self.timesteps}, ratio {self.ratio:g}, step {self.ratio_step:g} every "
                f"{self.every_n_steps}, s_noise {self.s_noise:g}")
        if self.unsharp is not None:
            u = self.unsharp
            text += f", unsharp {u.ksize},{u.sigma:g},{u.strength:g},{int(u.target_x)}"
        return text


def resolve(base: GradualLatent | None, spec: Any, where: str = "") -> GradualLatent | None:
    """The settings for one prompt line, as sd-scripts reads them: --glt sets the start timestep; any of
    --glr --gle --gls --glsn --glus turns gradual latent on for the line (start: --glt, else the flag, else 650);
    the others fall back to the command line. None: off."""
    names = ("gl_ratio", "gl_every_n_steps", "gl_ratio_step", "gl_s_noise", "gl_unsharp_params")
    base = base or GradualLatent()
    given = {name: getattr(spec, name, None) for name in names}
    timesteps = getattr(spec, "gl_timesteps", None)
    if timesteps is None and all(v is None for v in given.values()):
        return base if base.enabled else None
    if timesteps is None:
        timesteps = base.timesteps if base.timesteps is not None else DEFAULT_TIMESTEPS
    unsharp = base.unsharp
    if given["gl_unsharp_params"] is not None:
        unsharp = parse_unsharp(given["gl_unsharp_params"], f"{where}: --glus" if where else "--glus")

    def pick(name: str, default: Any) -> Any:
        return given[name] if given[name] is not None else default

    return GradualLatent(timesteps, pick("gl_ratio", base.ratio), pick("gl_ratio_step", base.ratio_step),
                         pick("gl_every_n_steps", base.every_n_steps), pick("gl_s_noise", base.s_noise), unsharp)


def gaussian_blur(x: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
    """torchvision's `gaussian_blur` (the one sd-scripts calls): a separable normalised Gaussian over
    `ksize` taps, reflect padding."""
    half = (ksize - 1) * 0.5
    coords = torch.linspace(-half, half, steps=ksize, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (coords / sigma).pow(2))
    kernel = (kernel / kernel.sum()).to(x.dtype if x.is_floating_point() else torch.float32)
    channels = x.shape[-3]
    k2d = (kernel[:, None] * kernel[None, :]).expand(channels, 1, ksize, ksize)
    pad = ksize // 2
    padded = F.pad(x, [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(padded, k2d, groups=channels)


def unsharp_mask(x: torch.Tensor, unsharp: Unsharp | None) -> torch.Tensor:
    if unsharp is None:
        return x
    return x + (x - gaussian_blur(x, unsharp.ksize, unsharp.sigma)) * unsharp.strength


def _bicubic(x: torch.Tensor, **size_or_scale: Any) -> torch.Tensor:
    dtype = x.dtype
    y = x.float() if dtype == torch.bfloat16 else x
    return F.interpolate(y, mode="bicubic", align_corners=False, **size_or_scale).to(dtype)


@functools.lru_cache(maxsize=None)
def scheduler_class() -> type:
    """`GradualLatentEulerA`, defined on first use so that importing this module does not import diffusers."""
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    class GradualLatentEulerA(EulerAncestralDiscreteScheduler):
        """Euler a whose steps also shrink (first step) and enlarge (every few steps) the latents; see module doc.

        State is per pipeline call and reset by `set_timesteps`, which every call starts with."""

        gradual: GradualLatent | None = None

        def set_gradual(self, gradual: GradualLatent) -> "GradualLatentEulerA":
            self.gradual = gradual
            self._reset_gradual()
            return self

        def _reset_gradual(self) -> None:
            self._full_size: tuple[int, int] | None = None
            self._ratio = self.gradual.ratio if self.gradual else 1.0
            self._elapsed = 1000  # sd-scripts' counter starts "long ago": the first eligible step enlarges

        def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
            super().set_timesteps(*args, **kwargs)
            self._reset_gradual()

        def _shrink_start(self, x: torch.Tensor) -> torch.Tensor:
            """The first step's input: shrunk by the start ratio (and sharpened), as sd-scripts before its loop."""
            return unsharp_mask(_bicubic(x, scale_factor=self._ratio), self.gradual.unsharp)

        def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
            if self.gradual is not None and self._full_size is None:
                self._full_size = tuple(sample.shape[-2:])
                sample = self._shrink_start(sample)
            return super().scale_model_input(sample, timestep)

        def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
                 generator: torch.Generator | None = None, return_dict: bool = True) -> Any:
            gl = self.gradual
            if gl is None:
                return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
            if sample.shape[-2:] != model_output.shape[-2:]:  # the first step: the pipeline's latents are full size
                sample = self._shrink_start(sample)
            size = self._next_size(float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else timestep)
            if size is None:
                out = super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
                self._warn_if_short()
                return out
            return self._enlarging_step(model_output, timestep, sample, size, generator, return_dict)

        def _warn_if_short(self) -> None:
            if self._step_index == len(self.timesteps) and self._ratio < 1.0:
                logger.warning("gradual latent: the steps ended at ratio %g, so the image is smaller than asked; "
                               "give more --steps, a larger --gradual_latent_ratio_step or fewer "
                               "--gradual_latent_every_n_steps", self._ratio)

        def _next_size(self, t: float) -> tuple[int, int] | None:
            """sd-scripts' rule, checked at each step: below the start timestep, every n steps, grow the ratio."""
            gl = self.gradual
            size = None
            if t < gl.timesteps and self._ratio < 1.0 and self._elapsed >= gl.every_n_steps:
                self._ratio = min(self._ratio + gl.ratio_step, 1.0)
                h, w = self._full_size
                # sd-scripts stops on a side of 0 (a full side under 8 / ratio): keep at least 8 (or the full side)
                size = (min(h, max(8, int(h * self._ratio) // 8 * 8)), min(w, max(8, int(w * self._ratio) // 8 * 8)))
                self._elapsed = 0
            self._elapsed += 1
            return size

        def _enlarging_step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
                            size: tuple[int, int], generator: Any, return_dict: bool) -> Any:
            """diffusers' Euler a step with the enlargement and the new-size noise of sd-scripts' GL scheduler."""
            gl = self.gradual
            if self.step_index is None:
                self._init_step_index(timestep)
            sigma = self.sigmas[self.step_index]
            sample = sample.to(torch.float32)
            if self.config.prediction_type == "epsilon":
                pred_original = sample - sigma * model_output
            elif self.config.prediction_type == "v_prediction":
                pred_original = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
            else:
                raise UserError(f"gradual latent: prediction type '{self.config.prediction_type}' is not supported")
            sigma_to = self.sigmas[self.step_index + 1]
            sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            derivative = (sample - pred_original) / sigma
            dt = sigma_down - sigma
            if gl.unsharp is None or gl.unsharp.target_x:
                prev = unsharp_mask(_bicubic(sample + derivative * dt, size=size), gl.unsharp)
            else:
                prev = unsharp_mask(_bicubic(sample, size=size), gl.unsharp) + _bicubic(derivative, size=size) * dt
            noise = randn_tensor((model_output.shape[0], model_output.shape[1], *size), dtype=model_output.dtype,
                                 device=model_output.device, generator=generator)
            prev = (prev + noise * sigma_up * gl.s_noise).to(model_output.dtype)
            self._step_index += 1
            self._warn_if_short()
            if not return_dict:
                return prev, pred_original
            return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=pred_original)

    return GradualLatentEulerA


def scheduler_for(base_scheduler: Any, gradual: GradualLatent) -> Any:
    """A gradual-latent Euler a with the pipeline scheduler's configuration (the same sigmas)."""
    return scheduler_class().from_config(base_scheduler.config).set_gradual(gradual)


__all__ = ["GradualLatent", "scheduler_class", "SUPPORTED_SAMPLERS", "Unsharp", "gaussian_blur",
           "parse_unsharp", "resolve", "scheduler_for"]
