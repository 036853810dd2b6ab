"""SDXL U-Net path names: diffusers `UNet2DConditionModel` <-> the original SGM (Stability generative-models) U-Net.

Published SDXL checkpoints, kohya LoRA files (`lora_unet_` + SGM path with dots as underscores) and ControlNet-LLLite
files (`lllite_unet_` + SGM path) all use the SGM names, while we run the diffusers module. These tables translate
module *and* parameter paths both ways, e.g.

    down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q  <->  input_blocks.4.1.transformer_blocks.0.attn1.to_q
    down_blocks.0.resnets.1.conv1.weight                        <->  input_blocks.2.0.in_layers.2.weight

The layout is SDXL's: three levels, two layers per block, no attention at the first level (tiny test models keep it).

Paths with no one-to-one counterpart raise KeyError: pure containers (`down_blocks`, `down_blocks.1.resnets`,
`input_blocks.4`, `in_layers`), parameter-free helpers used several times (`resnets.0.nonlinearity` is SGM's
`in_layers.1`, `emb_layers.0` and `out_layers.1` at once) and the timestep projections (functions in SGM). Every
parameter and every module that owns parameters maps.
"""
from __future__ import annotations

# Kinds of blocks: they decide how the path *inside* the block is translated.
RESNET = "resnet"
ATTENTION = "attention"
DOWNSAMPLE = "downsample"
UPSAMPLE = "upsample"
PLAIN = "plain"  # stand-alone module (conv_in, embeddings, output head): the inner path is kept as is

# (diffusers prefix, SGM prefix, kind). Written out in full so that the table can be read against a checkpoint.
UNET_BLOCKS: tuple[tuple[str, str, str], ...] = (
    ("conv_in", "input_blocks.0.0", PLAIN),
    ("time_embedding", "time_embed", PLAIN),  # inner names translated by UNET_TOP_INNER
    ("add_embedding", "label_emb.0", PLAIN),
    ("conv_norm_out", "out.0", PLAIN),
    ("conv_act", "out.1", PLAIN),
    ("conv_out", "out.2", PLAIN),
    # level 0: no attention
    ("down_blocks.0.resnets.0", "input_blocks.1.0", RESNET),
    ("down_blocks.0.resnets.1", "input_blocks.2.0", RESNET),
    ("down_blocks.0.downsamplers.0", "input_blocks.3.0", DOWNSAMPLE),
    # level 1
    ("down_blocks.1.resnets.0", "input_blocks.4.0", RESNET),
    ("down_blocks.1.attentions.0", "input_blocks.4.1", ATTENTION),
    ("down_blocks.1.resnets.1", "input_blocks.5.0", RESNET),
    ("down_blocks.1.attentions.1", "input_blocks.5.1", ATTENTION),
    ("down_blocks.1.downsamplers.0", "input_blocks.6.0", DOWNSAMPLE),
    # level 2 (no downsampler)
    ("down_blocks.2.resnets.0", "input_blocks.7.0", RESNET),
    ("down_blocks.2.attentions.0", "input_blocks.7.1", ATTENTION),
    ("down_blocks.2.resnets.1", "input_blocks.8.0", RESNET),
    ("down_blocks.2.attentions.1", "input_blocks.8.1", ATTENTION),
    # middle
    ("mid_block.resnets.0", "middle_block.0", RESNET),
    ("mid_block.attentions.0", "middle_block.1", ATTENTION),
    ("mid_block.resnets.1", "middle_block.2", RESNET),
    # up level 0 (lowest resolution, with attention): the upsampler comes after the attention -> index 2
    ("up_blocks.0.resnets.0", "output_blocks.0.0", RESNET),
    ("up_blocks.0.attentions.0", "output_blocks.0.1", ATTENTION),
    ("up_blocks.0.resnets.1", "output_blocks.1.0", RESNET),
    ("up_blocks.0.attentions.1", "output_blocks.1.1", ATTENTION),
    ("up_blocks.0.resnets.2", "output_blocks.2.0", RESNET),
    ("up_blocks.0.attentions.2", "output_blocks.2.1", ATTENTION),
    ("up_blocks.0.upsamplers.0", "output_blocks.2.2", UPSAMPLE),
    # up level 1
    ("up_blocks.1.resnets.0", "output_blocks.3.0", RESNET),
    ("up_blocks.1.attentions.0", "output_blocks.3.1", ATTENTION),
    ("up_blocks.1.resnets.1", "output_blocks.4.0", RESNET),
    ("up_blocks.1.attentions.1", "output_blocks.4.1", ATTENTION),
    ("up_blocks.1.resnets.2", "output_blocks.5.0", RESNET),
    ("up_blocks.1.attentions.2", "output_blocks.5.1", ATTENTION),
    ("up_blocks.1.upsamplers.0", "output_blocks.5.2", UPSAMPLE),
    # up level 2 (highest resolution, no attention, no upsampler)
    ("up_blocks.2.resnets.0", "output_blocks.6.0", RESNET),
    ("up_blocks.2.resnets.1", "output_blocks.7.0", RESNET),
    ("up_blocks.2.resnets.2", "output_blocks.8.0", RESNET),
)

# Inner names of the stand-alone modules that differ (diffusers, SGM), relative to the block prefix.
UNET_TOP_INNER: dict[str, tuple[tuple[str, str], ...]] = {
    "time_embedding": (("linear_1", "0"), ("act", "1"), ("linear_2", "2")),
    "add_embedding": (("linear_1", "0"), ("act", "1"), ("linear_2", "2")),
}

# ResnetBlock2D (diffusers) <-> ResBlock (SGM): in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, Conv].
RESNET_INNER: tuple[tuple[str, str], ...] = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("dropout", "out_layers.2"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
DOWNSAMPLE_INNER: tuple[tuple[str, str], ...] = (("conv", "op"),)
UPSAMPLE_INNER: tuple[tuple[str, str], ...] = (("conv", "conv"),)
# Transformer2DModel and SGM's SpatialTransformer share their inner names; only the first component is checked.
ATTENTION_CHILDREN: frozenset[str] = frozenset({"norm", "proj_in", "transformer_blocks", "proj_out"})

_INNER_BY_KIND: dict[str, tuple[tuple[str, str], ...]] = {
    RESNET: RESNET_INNER,
    DOWNSAMPLE: DOWNSAMPLE_INNER,
    UPSAMPLE: UPSAMPLE_INNER,
}


def _split_prefix(path: str, prefix: str) -> str | None:
    """The rest of `path` after `prefix` on a dot boundary ('' for the prefix itself), or None if it does not match."""
    if path == prefix:
        return ""
    if path.startswith(prefix + "."):
        return path[len(prefix) + 1:]
    return None


def _map_inner(rest: str, pairs: tuple[tuple[str, str], ...], src: int) -> str | None:
    """Translate the path inside a block with a (diffusers, sgm) pair table; `src` is the side we translate from."""
    for pair in pairs:
        tail = _split_prefix(rest, pair[src])
        if tail is not None:
            return pair[1 - src] + ("." + tail if tail else "")
    return None


def _translate(path: str, src: int) -> str:
    """Translate `path` from side `src` (0 = diffusers, 1 = SGM) to the other side, or raise KeyError."""
    best: tuple[str, str, str] | None = None
    best_rest: str | None = None
    for block in UNET_BLOCKS:
        rest = _split_prefix(path, block[src])
        if rest is not None and (best is None or len(block[src]) > len(best[src])):
            best, best_rest = block, rest
    if best is None or best_rest is None:
        raise KeyError(path)
    dst_prefix, kind = best[1 - src], best[2]
    if best_rest == "":
        return dst_prefix
    if kind == ATTENTION:
        if best_rest.split(".", 1)[0] not in ATTENTION_CHILDREN:
            raise KeyError(path)
        return f"{dst_prefix}.{best_rest}"
    if kind == PLAIN:
        inner_table = UNET_TOP_INNER.get(best[0])
        if inner_table is None:  # conv_in, conv_out, ...: only parameter names follow
            return f"{dst_prefix}.{best_rest}"
        inner = _map_inner(best_rest, inner_table, src)
    else:
        inner = _map_inner(best_rest, _INNER_BY_KIND[kind], src)
    if inner is None:
        raise KeyError(path)
    return f"{dst_prefix}.{inner}"


def diffusers_to_sgm(path: str) -> str:
    """SGM U-Net path (module or parameter, without `model.diffusion_model.`) for a diffusers U-Net path."""
    return _translate(path, 0)


def sgm_to_diffusers(path: str) -> str:
    """diffusers U-Net path (module or parameter) for an SGM U-Net path (without `model.diffusion_model.`)."""
    return _translate(path, 1)


def kohya_unet_name(diffusers_path: str, prefix: str = "lora_unet") -> str:
    """Published kohya-style module name, e.g. `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`."""
    return f"{prefix}_" + diffusers_to_sgm(diffusers_path).replace(".", "_")
