"""Module names and key layout of kohya-style network files (LoRA, LoCon; reused by FLUX LoRA).

A kohya file stores one module per wrapped layer, named `<prefix>_<module path with dots as underscores>`, with the
tensors `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha`. Other tools (ComfyUI, A1111, diffusers)
parse these names back, so we must write exactly the published spelling.

transformers 5 dropped the `text_model` wrapper of `CLIPTextModel`, so paths taken from `named_modules()` lose the
`text_model_` part that every published file (made with transformers 4) has. We always *write* the published
spelling and *read* both.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from networks.targets import KEY_ALPHA, KEY_DOWN, LORA_PREFIX_TEXT_ENCODER, LORA_PREFIX_TEXT_ENCODER_N

# Top-level children of transformers' CLIPTextTransformer: a path starting with one of these lacks the wrapper.
_CLIP_TRANSFORMER_CHILDREN = ("embeddings", "encoder", "final_layer_norm")
_CLIP_WRAPPER = "text_model"
# A CLIP text-encoder LoRA name written from a transformers-5 model (no `text_model_`). T5 (`encoder_block_`) never
# had the wrapper, so only CLIP's `encoder_layers_` is matched.
_UNWRAPPED_TE_NAME = re.compile(r"^(lora_te\d*)_encoder_layers_")


def lora_name(prefix: str, module_path: str) -> str:
    """The kohya module name: prefix + module path with dots replaced by underscores."""
    return f"{prefix}_{module_path}".replace(".", "_")


def text_encoder_prefix(index: int | None) -> str:
    """`lora_te` for a single text encoder, `lora_te1`, `lora_te2`, ... when a model has several (index from 1)."""
    return LORA_PREFIX_TEXT_ENCODER if index is None else LORA_PREFIX_TEXT_ENCODER_N.format(index=index)


def published_clip_path(module_path: str) -> str:
    """The transformers-4 module path of a CLIP text-encoder module (with the `text_model.` wrapper).

    `CLIPTextModelWithProjection` still has the wrapper in transformers 5, `CLIPTextModel` does not; both come out
    the same here.
    """
    if module_path.split(".", 1)[0] in _CLIP_TRANSFORMER_CHILDREN:
        return f"{_CLIP_WRAPPER}.{module_path}"
    return module_path


def normalize_lora_name(name: str) -> str:
    """The published spelling of a module name read from a file (adds `text_model_` to transformers-5 CLIP names)."""
    return _UNWRAPPED_TE_NAME.sub(r"\1_text_model_encoder_layers_", name)


def split_key(key: str) -> tuple[str, str]:
    """(module name, tensor suffix) of a file key, e.g. ('lora_unet_x', 'lora_down.weight')."""
    name, _, suffix = key.partition(".")
    return name, suffix


def normalize_state_dict(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a kohya state dict with every module name in its published spelling."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights_sd.items():
        name, suffix = split_key(key)
        out[f"{normalize_lora_name(name)}.{suffix}" if suffix else key] = value
    return out


def fill_missing_alphas(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy where every module has an `alpha`: files without one mean alpha = rank (scale 1)."""
    out = dict(weights_sd)
    for key, value in weights_sd.items():
        name, suffix = split_key(key)
        if suffix == KEY_DOWN and f"{name}.{KEY_ALPHA}" not in out:
            out[f"{name}.{KEY_ALPHA}"] = torch.tensor(float(value.shape[0]))
    return out


def prepare_for_loading(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published names and explicit alphas: what a network's state dict looks like."""
    return fill_missing_alphas(normalize_state_dict(weights_sd))


def infer_dims_and_alphas(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Rank and alpha of every module in a kohya state dict.

    The rank is the output size of `lora_down`; a module without an `alpha` tensor gets alpha = rank (scale 1), which
    is how sd-scripts and the other readers treat such files.
    """
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, suffix = split_key(key)
        if suffix == KEY_DOWN:
            dims[name] = int(value.shape[0])
        elif suffix == KEY_ALPHA:
            alphas[name] = float(value.float().item())
    for name, dim in dims.items():
        alphas.setdefault(name, float(dim))
    return dims, {name: alphas[name] for name in dims}


# sd-scripts' SDXL block numbering of U-Net module names (block-wise network_args): 0 time/label embeddings,
# 1-9 input_blocks 0-8, 10-12 middle_block 0-2, 13-21 output_blocks 0-8, 22 out.
_SDXL_BLOCK_OFFSETS = (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13))


def sdxl_block_index(name: str) -> int:
    """sd-scripts' block index (0-22) of an SDXL U-Net LoRA module name; -1 for a name outside the U-Net."""
    prefix = "lora_unet_"
    if not name.startswith(prefix):
        return -1
    rest = name[len(prefix):]
    if rest.startswith(("time_embed_", "label_emb_")):
        return 0
    for start, offset in _SDXL_BLOCK_OFFSETS:
        if rest.startswith(start):
            return offset + int(rest[len(start):].split("_", 1)[0])
    if rest.startswith("out_"):
        return 22
    return -1
