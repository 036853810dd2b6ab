"""FLUX single-file (BFL layout) <-> diffusers `FluxTransformer2DModel` key tables, and the FLUX autoencoder.

Black Forest Labs ship `flux1-dev.safetensors` with the module names of their reference code (`double_blocks.N.*`,
`single_blocks.N.*`, `img_in`, ...). We run diffusers' `FluxTransformer2DModel`, whose layout differs in three ways:

* names (`double_blocks.N.img_mod.lin` is `transformer_blocks.N.norm1.linear`, ...): the rows below;
* fused projections: BFL keeps one `img_attn.qkv` Linear (and, in single blocks, one `linear1` holding q, k, v and the
  MLP input projection); diffusers has separate `to_q` / `to_k` / `to_v` (/ `proj_mlp`). A row with several diffusers
  names is such a fusion: BFL's tensor is the concatenation (along the output dimension) of the diffusers tensors;
* the final AdaLayerNorm emits (shift, scale) in BFL and (scale, shift) in diffusers: the halves are swapped.

The same rows name LoRA modules (`lora_unet_double_blocks_0_img_attn_qkv`): kohya FLUX files use the BFL names.

The autoencoder file (`ae.safetensors`) is the LDM VAE layout without quant convs, so the SDXL VAE table applies.
Every conversion is exact, so a save/load round trip is bit-identical.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from library.models import sdxl_keys

StateDict = dict[str, torch.Tensor]

# Prefixes some tools (ComfyUI, sd-scripts' merged checkpoints) put in front of the transformer keys.
BFL_KEY_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")

# Block containers: (BFL, diffusers).
DOUBLE_BLOCKS = ("double_blocks", "transformer_blocks")
SINGLE_BLOCKS = ("single_blocks", "single_transformer_blocks")

# Linear layers (weight + bias) of one double block: BFL module -> diffusers module(s), fused in this order.
DOUBLE_BLOCK_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_mod.lin", ("norm1.linear",)),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
)
# Plain tensors of one double block (RMSNorm scales of the q/k normalisation): full key names.
DOUBLE_BLOCK_TENSORS: tuple[tuple[str, str], ...] = (
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
)
# Single blocks: linear1 = [q, k, v, mlp-in] fused; linear2 takes [attention, mlp] and is diffusers' proj_out.
SINGLE_BLOCK_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("modulation.lin", ("norm.linear",)),
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
)
SINGLE_BLOCK_TENSORS: tuple[tuple[str, str], ...] = (
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
)
# Linear layers outside the blocks. `guidance_in` exists only in guidance-distilled models (dev, not schnell).
TOP_LINEARS: tuple[tuple[str, str], ...] = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
GUIDANCE_LINEARS: tuple[tuple[str, str], ...] = (
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
)
# (shift, scale) in BFL, (scale, shift) in diffusers.
SWAPPED_LINEARS: tuple[tuple[str, str], ...] = (("final_layer.adaLN_modulation.1", "norm_out.linear"),)

LINEAR_PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class ModuleRow:
    """One BFL module and the diffusers module(s) holding its parameters."""

    bfl: str
    diffusers: tuple[str, ...]
    swap_halves: bool = False

    @property
    def fused(self) -> bool:
        return len(self.diffusers) > 1


def block_linear_rows(num_double: int, num_single: int) -> list[ModuleRow]:
    """The Linear layers inside the double and single blocks: what a FLUX LoRA wraps."""
    rows: list[ModuleRow] = []
    for i in range(num_double):
        for bfl, diff in DOUBLE_BLOCK_LINEARS:
            rows.append(ModuleRow(f"{DOUBLE_BLOCKS[0]}.{i}.{bfl}", tuple(f"{DOUBLE_BLOCKS[1]}.{i}.{d}" for d in diff)))
    for i in range(num_single):
        for bfl, diff in SINGLE_BLOCK_LINEARS:
            rows.append(ModuleRow(f"{SINGLE_BLOCKS[0]}.{i}.{bfl}", tuple(f"{SINGLE_BLOCKS[1]}.{i}.{d}" for d in diff)))
    return rows


def transformer_linear_rows(num_double: int, num_single: int, guidance: bool) -> list[ModuleRow]:
    """Every Linear of the transformer (blocks and the layers around them)."""
    rows = [ModuleRow(b, (d,)) for b, d in TOP_LINEARS + (GUIDANCE_LINEARS if guidance else ())]
    rows += [ModuleRow(b, (d,), swap_halves=True) for b, d in SWAPPED_LINEARS]
    return rows + block_linear_rows(num_double, num_single)


def transformer_tensor_rows(num_double: int, num_single: int) -> list[tuple[str, str]]:
    """Full-key renames of the non-Linear tensors (q/k RMSNorm scales)."""
    rows: list[tuple[str, str]] = []
    for i in range(num_double):
        rows += [(f"{DOUBLE_BLOCKS[0]}.{i}.{b}", f"{DOUBLE_BLOCKS[1]}.{i}.{d}") for b, d in DOUBLE_BLOCK_TENSORS]
    for i in range(num_single):
        rows += [(f"{SINGLE_BLOCKS[0]}.{i}.{b}", f"{SINGLE_BLOCKS[1]}.{i}.{d}") for b, d in SINGLE_BLOCK_TENSORS]
    return rows


# ----------------------------------------------------------------------------------------------------------------
def strip_bfl_prefix(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop a `model.diffusion_model.`-style prefix when every transformer key has it."""
    for prefix in BFL_KEY_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def count_blocks(keys, container: str) -> int:
    found = {int(k.split(".")[1]) for k in keys if k.startswith(container + ".") and k.split(".")[1].isdigit()}
    return max(found) + 1 if found else 0


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _split_sizes(row: ModuleRow, fused: torch.Tensor, hidden: int) -> list[int]:
    """Output sizes of the parts of a fused tensor: q, k, v are `hidden` wide; a 4th part (single-block MLP) takes
    the rest."""
    n = len(row.diffusers)
    if n == 3:
        return [fused.shape[0] // 3] * 3
    return [hidden] * (n - 1) + [fused.shape[0] - hidden * (n - 1)]


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor], missing: list[str] | None = None,
                     unknown: list[str] | None = None) -> StateDict:
    """Convert a BFL transformer state dict to `FluxTransformer2DModel` names.

    Keys the table expects but the file lacks go to `missing` (BFL names), keys the table does not know go to
    `unknown`; the caller decides whether that is an error (the loader names them in its message).
    """
    src = strip_bfl_prefix(sd)
    num_double, num_single = count_blocks(src, DOUBLE_BLOCKS[0]), count_blocks(src, SINGLE_BLOCKS[0])
    guidance = any(k.startswith("guidance_in.") for k in src)
    hidden = src["img_in.weight"].shape[0] if "img_in.weight" in src else 0
    used: set[str] = set()
    out: StateDict = {}
    for row in transformer_linear_rows(num_double, num_single, guidance):
        for param in LINEAR_PARAMS:
            key = f"{row.bfl}.{param}"
            if key not in src:
                if missing is not None:
                    missing.append(key)
                continue
            used.add(key)
            value = _swap_halves(src[key]) if row.swap_halves else src[key]
            if not row.fused:
                out[f"{row.diffusers[0]}.{param}"] = value
                continue
            for name, part in zip(row.diffusers, torch.split(value, _split_sizes(row, value, hidden), dim=0)):
                out[f"{name}.{param}"] = part.clone()
    for bfl, diff in transformer_tensor_rows(num_double, num_single):
        if bfl not in src:
            if missing is not None:
                missing.append(bfl)
            continue
        used.add(bfl)
        out[diff] = src[bfl]
    if unknown is not None:
        unknown.extend(sorted(set(src) - used))
    return out


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert a `FluxTransformer2DModel` state dict to the BFL single-file names (exact inverse of the above)."""
    num_double, num_single = count_blocks(sd, DOUBLE_BLOCKS[1]), count_blocks(sd, SINGLE_BLOCKS[1])
    guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in sd)
    out: StateDict = {}
    used: set[str] = set()
    for row in transformer_linear_rows(num_double, num_single, guidance):
        for param in LINEAR_PARAMS:
            parts = [f"{d}.{param}" for d in row.diffusers]
            value = torch.cat([sd[p] for p in parts], dim=0) if row.fused else sd[parts[0]]
            out[f"{row.bfl}.{param}"] = _swap_halves(value) if row.swap_halves else value
            used.update(parts)
    for bfl, diff in transformer_tensor_rows(num_double, num_single):
        out[bfl] = sd[diff]
        used.add(diff)
    extra = sorted(set(sd) - used)
    if extra:
        raise KeyError(f"FLUX transformer keys without a BFL name: {extra[:5]}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Autoencoder: BFL's ae.safetensors is the LDM layout (encoder.down.i.block.j ...) without quant convs.
def ae_to_diffusers(sd: Mapping[str, torch.Tensor], unknown: list[str] | None = None) -> StateDict:
    """BFL / LDM autoencoder keys -> diffusers `AutoencoderKL` keys."""
    prefix = sdxl_keys.VAE_PREFIX
    src = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    found: list[str] = []
    out = sdxl_keys.ldm_vae_to_diffusers(src, found)
    if unknown is not None:
        unknown.extend(k[len(prefix):] if k.startswith(prefix) else k for k in found)
    return out


def diffusers_to_ae(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers `AutoencoderKL` keys -> BFL `ae.safetensors` keys."""
    return sdxl_keys.diffusers_vae_to_ldm(sd)
