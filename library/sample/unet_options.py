"""What SDXL generation adds around one pipeline call for --negative_scale, Deep Shrink and gradual latent (the
request's resolved settings, see `generation._unet_options`), and the checks made before any model loads.

Each feature installs hooks (or swaps the scheduler) only for the call that uses it, so a request without them runs
exactly the pipeline of a run without these flags.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence

import torch

from library.errors import UserError
from library.prompts.samplers import canonical_sampler_name
from library.sample import deep_shrink, gradual_latent
from library.sample.deep_shrink import deep_shrink_hooks
from library.sample.negative_scale import negative_scale_hooks

logger = logging.getLogger(__name__)


def check_unet_options(config: Any) -> None:
    """Before loading: Deep Shrink and gradual latent change the U-Net's working size, which ControlNets,
    ControlNet-LLLite and regional masks (laid out at the full size) cannot follow; gradual latent on another sampler than
    Euler a is ignored with a warning, as sd-scripts does."""
    shrink = any(deep_shrink.resolve(config.deep_shrink, p) is not None for p in config.prompts)
    gradual = any(gradual_latent.resolve(config.gradual_latent, p) is not None for p in config.prompts)
    for used, name in ((shrink, "Deep Shrink (--ds_depth_1 or --dsd1 ...)"),
                       (gradual, "gradual latent (--gradual_latent_timesteps or --glt ...)")):
        if used and (config.lllite or config.controlnets):
            raise UserError(f"{name} cannot be combined with --control_net_lllite_models / --control_net_models: "
                            "their guidance is computed at the full latent size; drop one of them")
        if used and getattr(config, "mask_path", None):
            raise UserError(f"{name} cannot be combined with --mask_path: the regions are laid out for the full "
                            "latent size; drop one of them")
    if gradual and config.sampler and canonical_sampler_name(config.sampler) not in gradual_latent.SUPPORTED_SAMPLERS:
        logger.warning("gradual latent works with --sampler euler_a (k_euler_a) only, as in sd-scripts; it is "
                       "ignored with --sampler %s", config.sampler)


@contextlib.contextmanager
def swapped_schedulers(pipes: Sequence[Any], gradual: Any) -> Iterator[None]:
    """The pipelines' scheduler replaced by gradual latent's Euler a for one call, then restored."""
    saved = [(pipe, pipe.scheduler) for pipe in pipes if pipe is not None]
    for pipe, scheduler in saved:
        pipe.scheduler = gradual_latent.scheduler_for(scheduler, gradual)
    try:
        yield
    finally:
        for pipe, scheduler in saved:
            pipe.scheduler = scheduler


def unet_options(request: Any, unet: torch.nn.Module, pipes: Sequence[Any], sampler: str,
                 empty_embeds: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> contextlib.ExitStack:
    """Hooks for one batch (all its requests share these settings): enter the returned stack around the call.
    `empty_embeds` encodes the empty prompt for --negative_scale, only when it is used."""
    stack = contextlib.ExitStack()
    stack.enter_context(deep_shrink_hooks(unet, request.deep_shrink))
    if request.negative_scale is not None:
        if request.scale > 1.0:
            embeds, pooled = empty_embeds()
            stack.enter_context(negative_scale_hooks(unet, request.negative_scale, request.scale, embeds, pooled))
        else:
            logger.warning("--negative_scale is ignored with a guidance scale of %g (no guidance at or below 1)",
                           request.scale)
    if request.gradual_latent is not None and canonical_sampler_name(sampler) in gradual_latent.SUPPORTED_SAMPLERS:
        stack.enter_context(swapped_schedulers(pipes, request.gradual_latent))
    return stack


__all__ = ["check_unet_options", "swapped_schedulers", "unet_options"]
