"""`--negative_scale` (prompt option `--nl`): a guidance scale of its own for the negative prompt.

sd-scripts' generator runs the U-Net on three conditionings, the negative prompt (n), the prompt (c) and the empty
prompt (u), and combines

    noise = u + scale * (c - u) - negative_scale * (n - u)

so the prompt pulls from the empty prompt and the negative prompt pushes away with its own strength; plain
classifier-free guidance is the case where n is the empty prompt. (sd-scripts' SDXL generator stops with a
TypeError when the flag is given: its call that encodes the empty prompt lacks the text encoder; the formula and
the three-way batch here are those of its pipeline.) Without guidance (scale <= 1) the flag is ignored, as there.

diffusers' SDXL pipelines run the U-Net on [n, c] and combine n + scale * (c - n) themselves. The hooks here widen
that batch to [n, c, u] (the empty prompt with the negative prompt's size conditioning, any ControlNet residuals of
the negative half) and hand back [n', c] with n' = u + negative_scale / (scale - 1) * (n - u), for which the
pipeline's own combination is exactly the formula above. One U-Net call per step, as in sd-scripts.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from library.sample.long_prompt import encode_sdxl_prompts


def _extend(x: Any, b: int) -> Any:
    """[n, c] -> [n, c, n] for batch-shaped tensors (the empty prompt shares the negative half's other inputs)."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 2 * b:
        return torch.cat([x, x[:b]])
    return x


class _Hooks:
    def __init__(self, unet: torch.nn.Module, negative_scale: float, guidance_scale: float,
                 empty_embeds: torch.Tensor, empty_pooled: torch.Tensor):
        self.factor = negative_scale / (guidance_scale - 1.0)
        self.empty_embeds = empty_embeds
        self.empty_pooled = empty_pooled
        self.b = empty_embeds.shape[0]
        self.widened = False
        self.handles = [unet.register_forward_pre_hook(self._widen, with_kwargs=True),
                        unet.register_forward_hook(self._combine)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _widen(self, module, args, kwargs):
        b = self.b
        sample = args[0] if args else kwargs["sample"]
        self.widened = sample.shape[0] == 2 * b
        if not self.widened:  # no guidance in this call
            return None
        args = list(args)
        sample = torch.cat([sample, sample[b:]])
        if args:
            args[0] = sample
        else:
            kwargs["sample"] = sample
        if len(args) > 1:
            args[1] = _extend(args[1], b)
        elif "timestep" in kwargs:
            kwargs["timestep"] = _extend(kwargs["timestep"], b)
        if len(args) > 2:
            ehs = args[2]
        else:
            ehs = kwargs["encoder_hidden_states"]
        ehs = torch.cat([ehs, self.empty_embeds.to(ehs.device, ehs.dtype)])
        if len(args) > 2:
            args[2] = ehs
        else:
            kwargs["encoder_hidden_states"] = ehs
        added = kwargs.get("added_cond_kwargs")
        if added is not None:
            added = {key: _extend(value, b) for key, value in added.items()}
            if "text_embeds" in added:
                pooled = added["text_embeds"][: 2 * b]
                added["text_embeds"] = torch.cat([pooled, self.empty_pooled.to(pooled.device, pooled.dtype)])
            kwargs["added_cond_kwargs"] = added
        for name in ("down_block_additional_residuals", "down_intrablock_additional_residuals"):
            if kwargs.get(name) is not None:
                kwargs[name] = tuple(_extend(r, b) for r in kwargs[name])
        if kwargs.get("mid_block_additional_residual") is not None:
            kwargs["mid_block_additional_residual"] = _extend(kwargs["mid_block_additional_residual"], b)
        return tuple(args), kwargs

    def _combine(self, module, args, output):
        if not self.widened:
            return None
        self.widened = False
        pred = output[0] if isinstance(output, tuple) else output.sample
        negative, cond, empty = pred.chunk(3)
        combined = torch.cat([empty + self.factor * (negative - empty), cond])
        if isinstance(output, tuple):
            return (combined, *output[1:])
        output.sample = combined
        return output


@contextlib.contextmanager
def negative_scale_hooks(unet: torch.nn.Module, negative_scale: float | None, guidance_scale: float,
                         empty_embeds: torch.Tensor | None, empty_pooled: torch.Tensor | None) -> Iterator[None]:
    """The three-way guidance on `unet` for one pipeline call; nothing is hooked when negative_scale is None or
    there is no guidance (scale <= 1). `empty_*`: the empty prompt's embeddings, one row per image, with the
    sequence length of the batch's prompt embeddings."""
    if negative_scale is None or guidance_scale <= 1.0 or empty_embeds is None:
        yield
        return
    hooks = _Hooks(unet, negative_scale, guidance_scale, empty_embeds, empty_pooled)
    try:
        yield
    finally:
        hooks.remove()


@torch.no_grad()
def empty_prompt_embeds(tokenizers: Sequence[Any], text_encoders: Sequence[Any], prompts: Sequence[str],
                        negatives: Sequence[str], max_multiples: int, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's embeddings and pooled embeddings, one row per image, encoded as sd-scripts' weighted
    encoding does at the chunk count of the batch's prompts and negative prompts (so the three conditionings have
    one sequence length and share one U-Net batch)."""
    texts = list(prompts) + list(negatives)
    embeds = encode_sdxl_prompts(tokenizers, text_encoders, texts, [""] * len(prompts), max_multiples, device)
    return embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds


__all__ = ["empty_prompt_embeds", "negative_scale_hooks"]
