"""What --cache_text_encoder_outputs can cache when the network also trains text encoders.

sd-scripts' FLUX trainer caches T5's outputs and runs a trained CLIP-L every step ("partial" caching; fluxgym's
command line relies on it); its SDXL trainer refuses a cache while a text encoder is trained, because both CLIPs
feed the same hidden states. Here a family says which outputs each of its encoders alone produces
(`ModelFamily.text_outputs_by_encoder`): the outputs of the encoders the network does not train are cached, the
trained encoders run every step with gradients into their LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

from library.errors import UserError


@dataclass(frozen=True)
class TextCachePlan:
    """`outputs`: what the cache holds (None: every output, a full cache). `live_encoders`: the encoders (indices)
    that run every step because the network trains them."""

    outputs: tuple[str, ...] | None
    live_encoders: tuple[int, ...] = ()


def plan_text_cache(asked: bool, trained: list[bool],
                    outputs_by_encoder: tuple[tuple[str, ...], ...]) -> TextCachePlan | None:
    """The cache a run gets (None: none). `asked`: --cache_text_encoder_outputs or its _to_disk variant;
    `trained`: per text encoder, whether the network trains it; `outputs_by_encoder`: the family's
    `text_outputs_by_encoder`."""
    if not asked:
        return None
    if not any(trained):
        return TextCachePlan(outputs=None)
    if not outputs_by_encoder:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only with this model: its text "
                        "encoders' outputs are combined, so cached outputs cannot train a text-encoder LoRA")
    if all(trained):
        from library.config.environment_flags import warn_once

        # sd-scripts stops here ("T5XXL is trained, so cache_text_encoder_outputs cannot be used"); the run is
        # still well defined: every encoder is trained, so every output is encoded every step
        warn_once(["--cache_text_encoder_outputs: the network trains every text encoder (train_t5xxl), so no "
                   "text-encoder output can be cached; they are encoded every step instead"])
        return None
    cached = tuple(key for keys, t in zip(outputs_by_encoder, trained) if not t for key in keys)
    return TextCachePlan(outputs=cached, live_encoders=tuple(i for i, t in enumerate(trained) if t))
