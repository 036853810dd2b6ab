"""LoRA for FLUX.1 in kohya's file layout, with sd-scripts' network-module interface.

`--network_module networks.lora_flux` (the default of flux_train_network.py).

The transformer runs as diffusers' `FluxTransformer2DModel`, but published FLUX LoRA files (sd-scripts, ComfyUI,
diffusers' kohya reader) name modules after BFL's reference code: `lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_single_blocks_0_linear1`, ... The key table in library.models.flux_keys gives, for each BFL Linear, the
diffusers Linear(s) holding it. Where BFL fuses layers that diffusers keeps apart (q/k/v, and in single blocks
q/k/v + MLP input), one `FusedLoRAModule` holds one `lora_down` and one `lora_up` over the concatenated outputs and
adds each member layer its rows of the update: the file then has exactly the published shapes.

`split_qkv=True` (network_args) trains q, k, v (and the MLP input) with separate rank-r updates, as sd-scripts does;
they are stored fused, the sd-scripts way: `lora_down` stacked (rank n*r), `lora_up` block-diagonal. The stored
alpha is n times the per-part alpha, so that `alpha / rank` (what every reader computes) is the trained scale.

Text encoders (optional): CLIP-L as `lora_te1_text_model_encoder_layers_*` (published transformers-4 spelling) and,
with `train_t5xxl=True`, T5 as `lora_te3_encoder_block_*`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from library.errors import ConfigError, ModelLoadError
from library.models import flux_keys
from networks import flux_args as fa
from networks import kohya_names as kn
from networks import lora as base
from networks.block_args import BLOCK_ARGS
from networks.kinds import NetworkKind
from networks.lora import LoRANetwork, LoRATarget, find_targets
from networks.lora_modules import FusedLoRAModule, LoRAModule  # re-exported (FusedLoRAModule was defined here)
from networks.targets import LORA_PREFIX_UNET, TEXT_ENCODER_TARGET_CONTAINERS

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.lora_flux"
# We take our diffusers models as they are (names are translated here); see networks/protocol.py.
NATIVE_MODELS = True
LORA_PREFIX_CLIP = "lora_te1"
LORA_PREFIX_T5 = "lora_te3"
T5_TARGET_CONTAINERS: tuple[str, ...] = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")
TRAIN_BLOCKS = ("all", "single", "double")
_FLUX_ARGS = ("train_blocks", "split_qkv", "train_t5xxl")
_IGNORED_ARGS = ("conv_dim", "conv_alpha")
# sd-scripts' gradient-perturbation options (GGPO): not implemented here, training goes on without them
_UNIMPLEMENTED_ARGS = ("ggpo_beta", "ggpo_sigma")


# --------------------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------------------


def _block_counts(transformer: nn.Module) -> tuple[int, int]:
    cfg = getattr(transformer, "config", None)
    if cfg is not None and hasattr(cfg, "num_layers"):
        return int(cfg.num_layers), int(cfg.num_single_layers)
    names = [n for n, _ in transformer.named_modules()]
    return (flux_keys.count_blocks(names, flux_keys.DOUBLE_BLOCKS[1]),
            flux_keys.count_blocks(names, flux_keys.SINGLE_BLOCKS[1]))


def transformer_targets(transformer: nn.Module, train_blocks: str = "all") -> list[tuple[str, tuple[nn.Linear, ...]]]:
    """(kohya name, diffusers Linear(s)) for every Linear of the double / single blocks."""
    if train_blocks not in TRAIN_BLOCKS:
        raise ConfigError(f"expected one of {TRAIN_BLOCKS}, got {train_blocks!r}", table="--network_args",
                          key="train_blocks")
    modules = dict(transformer.named_modules())
    num_double, num_single = _block_counts(transformer)
    out = []
    for row in flux_keys.block_linear_rows(num_double, num_single):
        is_double = row.bfl.startswith(flux_keys.DOUBLE_BLOCKS[0] + ".")
        if (train_blocks == "single" and is_double) or (train_blocks == "double" and not is_double):
            continue
        try:
            layers = tuple(modules[d] for d in row.diffusers)
        except KeyError as e:
            raise ModelLoadError(f"FLUX transformer has no module {e.args[0]!r}: networks.lora_flux expects diffusers' "
                                 "FluxTransformer2DModel") from None
        out.append((kn.lora_name(LORA_PREFIX_UNET, row.bfl), layers))
    return out


def input_layer_targets(transformer: nn.Module, in_dims: Sequence[int]) -> list[tuple[str, nn.Linear, int]]:
    """(kohya name, Linear, rank) of the layers outside the blocks that `in_dims` gives a rank (img_in, time_in,
    vector_in, guidance_in, txt_in; guidance_in only where the model has it)."""
    modules = dict(transformer.named_modules())
    out = []
    for bfl, diffusers_name in flux_keys.TOP_LINEARS + flux_keys.GUIDANCE_LINEARS:
        name = kn.lora_name(LORA_PREFIX_UNET, bfl)
        for fragment, dim in zip(fa.IN_DIM_FILTERS, in_dims):
            if fragment in name and dim and diffusers_name in modules:
                out.append((name, modules[diffusers_name], dim))
    return out


def text_encoder_targets(text_encoders: Sequence[nn.Module], train_t5xxl: bool) -> list[LoRATarget]:
    """CLIP-L (first encoder) as lora_te1_*, T5 (second) as lora_te3_* when asked for."""
    targets: list[LoRATarget] = []
    if len(text_encoders) > 0 and text_encoders[0] is not None:
        targets += find_targets(text_encoders[0], TEXT_ENCODER_TARGET_CONTAINERS,
                                lambda p: kn.lora_name(LORA_PREFIX_CLIP, kn.published_clip_path(p)))
    if train_t5xxl and len(text_encoders) > 1 and text_encoders[1] is not None:
        targets += find_targets(text_encoders[1], T5_TARGET_CONTAINERS, lambda p: kn.lora_name(LORA_PREFIX_T5, p))
    return targets


# --------------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------------


class FluxLoRANetwork(LoRANetwork):
    """All LoRA modules of one FLUX model; `state_dict()` is exactly the kohya FLUX file layout.

    Applying, saving, loading, merging and the optimizer groups are LoRANetwork's; only the module set differs.
    """

    def __init__(self, text_encoders: Any, transformer: nn.Module | None, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, modules_dim: Mapping[str, int] | None = None,
                 modules_alpha: Mapping[str, float] | None = None, train_blocks: str = "all", split_qkv: bool = False,
                 train_t5xxl: bool = False, loraplus_lr_ratio: float | None = None,
                 loraplus_unet_lr_ratio: float | None = None, loraplus_text_encoder_lr_ratio: float | None = None,
                 kind: str | NetworkKind = "lora", type_dims: Sequence[int | None] | None = None,
                 in_dims: Sequence[int] | None = None, train_double_block_indices: str | None = None,
                 train_single_block_indices: str | None = None, reg_dims: Mapping[str, int] | None = None,
                 reg_lrs: Mapping[str, float] | None = None, verbose: bool = False):
        super().__init__([], None, multiplier=multiplier, lora_dim=lora_dim, alpha=alpha, dropout=dropout,
                         rank_dropout=rank_dropout, module_dropout=module_dropout,
                         loraplus_lr_ratio=loraplus_lr_ratio, loraplus_unet_lr_ratio=loraplus_unet_lr_ratio,
                         loraplus_text_encoder_lr_ratio=loraplus_text_encoder_lr_ratio, kind=kind)
        if self.kind.fused_module_class is None:
            raise ConfigError(f"network kind {self.kind.name!r} cannot adapt FLUX's fused layers (qkv, linear1)",
                              table="--network_args", key="kind")
        self.train_blocks, self.split_qkv, self.train_t5xxl = train_blocks, bool(split_qkv), bool(train_t5xxl)
        # sd-scripts' finer choices (networks/flux_args.py); a file's own shapes override them all
        self.type_dims = list(type_dims) if type_dims is not None and modules_dim is None else None
        self.reg_dims = dict(reg_dims) if reg_dims and modules_dim is None else None
        self.reg_lrs = dict(reg_lrs) if reg_lrs else None
        self._selected: dict[str, list[bool]] = {}
        if transformer is not None and modules_dim is None:
            counts = dict(zip(("double", "single"), _block_counts(transformer)))
            for kind_name, raw in (("double", train_double_block_indices), ("single", train_single_block_indices)):
                if raw is not None:
                    self._selected[kind_name] = fa.parse_block_selection(f"train_{kind_name}_block_indices", raw,
                                                                         counts[kind_name])
        tes = base._text_encoder_list(text_encoders)
        if modules_dim is not None:  # from a file: every module the file has, whatever the flags say
            train_t5xxl = any(name.startswith(LORA_PREFIX_T5 + "_") for name in modules_dim)
            train_blocks = "all"
        te_targets = text_encoder_targets(tes, train_t5xxl)
        if self.reg_dims:  # a regex rank applies to text-encoder modules too
            te_modules = {t.name: self.lora_dim if (m := fa.first_match(self.reg_dims, t.name)) is None else int(m[1])
                          for t in te_targets}
            te_alphas = {name: self.alpha for name in te_modules}
            self.text_encoder_loras = self._make_modules(te_targets, te_modules, te_alphas)
        else:
            self.text_encoder_loras = self._make_modules(te_targets, modules_dim, modules_alpha)
        self.unet_loras = []
        if transformer is not None:
            for name, layers in transformer_targets(transformer, train_blocks):
                module = self._make_transformer_module(name, layers, modules_dim, modules_alpha)
                if module is not None:
                    self.unet_loras.append(module)
            top = ([(n, (layer,), d) for n, layer, d in input_layer_targets(transformer, in_dims)]
                   if in_dims and modules_dim is None else [])
            if modules_dim is not None:  # a file's input-layer modules
                top = [(n, (layer,), 0) for n, layer, _ in input_layer_targets(transformer, [1] * 5)]
            for name, layers, dim in top:
                module = self._make_transformer_module(name, layers, modules_dim, modules_alpha, default_dim=dim)
                if module is not None:
                    self.unet_loras.append(module)
        if modules_dim is not None:
            made = {m.lora_name for m in self.loras}
            self.unmatched_names = sorted(set(modules_dim) - made)
        for lora in self.loras:
            self.add_module(lora.lora_name, lora)
        logger.info("FLUX LoRA: %d text-encoder modules, %d transformer modules", len(self.text_encoder_loras),
                    len(self.unet_loras))
        if verbose:
            for lora in self.loras:
                logger.info("  %-60s rank %d, alpha %s", lora.lora_name, lora.lora_dim, float(lora.alpha))

    def _rank(self, name: str, default_dim: int | None) -> int:
        """sd-scripts' order: a network_reg_dims regex, else the type dim (blocks) or in_dims rank, else network_dim;
        a block left out by train_*_block_indices gets 0 (no module)."""
        match = fa.first_match(self.reg_dims, name)
        if match is not None:
            return int(match[1])
        if default_dim is not None:
            return default_dim
        dim = self.lora_dim
        typed = fa.type_dim(self.type_dims, name)
        if typed is not None:
            dim = typed
        for kind_name, selected in self._selected.items():
            prefix = f"{LORA_PREFIX_UNET}_{kind_name}_blocks_"
            if dim and name.startswith(prefix) and not selected[int(name[len(prefix):].split("_", 1)[0])]:
                return 0
        return dim

    def _make_transformer_module(self, name: str, layers: tuple[nn.Linear, ...],
                                 modules_dim: Mapping[str, int] | None,
                                 modules_alpha: Mapping[str, float] | None,
                                 default_dim: int | None = None) -> LoRAModule | None:
        if modules_dim is not None:
            if name not in modules_dim:
                return None
            dim, alpha, split = modules_dim[name], (modules_alpha or {}).get(name, modules_dim[name]), False
        else:
            dim, alpha, split = self._rank(name, default_dim), self.alpha, self.split_qkv
            if not dim:
                return None
        if len(layers) == 1:
            return self.kind.module_class(name, layers[0], self.multiplier, dim, alpha, self.dropout,
                                          self.rank_dropout, self.module_dropout)
        return self.kind.fused_module_class(name, layers, self.multiplier, dim, alpha, self.dropout,
                                            self.rank_dropout, self.module_dropout, split=split)


    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float | None) -> tuple[list[dict[str, Any]], list[str]]:
        """LoRANetwork's groups, except that modules matching a `network_reg_lrs` regex learn at its rate (one group
        per regex, LoRA+ ratio applied to their `lora_up`), as sd-scripts does."""
        if not self.reg_lrs:
            return super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
        matched: dict[int, list[LoRAModule]] = {}
        rest: dict[str, list[LoRAModule]] = {"te": [], "unet": []}
        for part, loras in (("te", self.text_encoder_loras), ("unet", self.unet_loras)):
            for lora in loras:
                match = fa.first_match(self.reg_lrs, lora.lora_name)
                (rest[part] if match is None else matched.setdefault(match[0], [])).append(lora)
        all_te, all_unet = self.text_encoder_loras, self.unet_loras
        try:
            self.text_encoder_loras, self.unet_loras = rest["te"], rest["unet"]
            groups, descriptions = super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
        finally:
            self.text_encoder_loras, self.unet_loras = all_te, all_unet
        rates = list(self.reg_lrs.values())
        for i in sorted(matched):
            is_te = {id(m) for m in all_te}
            ratio = (self.loraplus_text_encoder_lr_ratio if id(matched[i][0]) in is_te
                     else self.loraplus_unet_lr_ratio) or self.loraplus_lr_ratio
            named = [(n, p) for lora in matched[i] for n, p in lora.named_parameters()]
            plain = [p for n, p in named if ratio is None or "lora_up" not in n]
            plus = [p for n, p in named if ratio is not None and "lora_up" in n]
            for params, factor, suffix in ((plain, 1.0, ""), (plus, ratio, " plus")):
                if params and rates[i]:
                    groups.append({"params": params, "lr": rates[i] * factor})
                    descriptions.append(f"reg_lr_{i}{suffix}")
        return groups, descriptions


# --------------------------------------------------------------------------------------------------------------------
# sd-scripts' module-level entry points
# --------------------------------------------------------------------------------------------------------------------


def _bool_arg(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ConfigError(f"expected True or False, got {raw!r}", table="--network_args", key=key)


def parse_flux_network_args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """FLUX's own network_args (train_blocks, split_qkv, train_t5xxl) plus the shared ones of networks.lora."""
    out: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for key, raw in kwargs.items():
        if raw is None:
            continue
        if key in _IGNORED_ARGS:
            logger.warning("--network_args %s=%s is ignored: FLUX has no convolutions in its blocks", key, raw)
        elif key == "train_blocks":
            value = str(raw).strip().lower()
            if value not in TRAIN_BLOCKS:
                raise ConfigError(f"expected one of {TRAIN_BLOCKS}, got {raw!r}", table="--network_args", key=key)
            out[key] = value
        elif key in ("split_qkv", "train_t5xxl", "verbose"):
            out[key] = _bool_arg(key, raw)
        elif key in fa.TYPE_DIM_KEYS:
            out[key] = fa.rank(key, raw)
        elif key == "in_dims":
            out[key] = fa.parse_in_dims(raw)
        elif key in fa.BLOCK_INDEX_KEYS:
            out[key] = str(raw)  # checked against the model's block counts when the network is built
        elif key in fa.REGEX_KEYS:
            out[key] = fa.parse_regex_values(key, raw, int if key == "network_reg_dims" else float)
        elif key in _UNIMPLEMENTED_ARGS:
            logger.warning("--network_args %s=%s is ignored: GGPO (gradient perturbation) is not implemented here; "
                           "the network trains without it", key, raw)
        elif key in BLOCK_ARGS:
            logger.warning("--network_args %s=%s is ignored: it is a block-wise option of SDXL's networks.lora; "
                           "FLUX selects blocks with train_double_block_indices / train_single_block_indices", key,
                           raw)
        else:
            shared[key] = raw
    out.update(base._parse_network_args(shared))
    return out


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> FluxLoRANetwork:
    """A fresh FLUX network. `kwargs` are `--network_args` strings: train_blocks (all|single|double), split_qkv,
    train_t5xxl, rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio,
    loraplus_text_encoder_lr_ratio, the per-layer-type ranks (img_attn_dim, ..., single_mod_dim), in_dims,
    train_double_block_indices, train_single_block_indices, network_reg_dims, network_reg_lrs, verbose
    (networks/flux_args.py); conv_dim / conv_alpha and ggpo_* are ignored with a warning."""
    args = parse_flux_network_args(kwargs)
    type_dims = [args.get(k) for k in fa.TYPE_DIM_KEYS]
    return FluxLoRANetwork(
        text_encoder, unet, multiplier=multiplier, lora_dim=4 if network_dim is None else int(network_dim),
        alpha=1.0 if network_alpha is None else float(network_alpha),
        dropout=neuron_dropout if neuron_dropout is not None else args.get("dropout"),
        rank_dropout=args.get("rank_dropout"), module_dropout=args.get("module_dropout"),
        train_blocks=args.get("train_blocks", "all"), split_qkv=args.get("split_qkv", False),
        train_t5xxl=args.get("train_t5xxl", False), loraplus_lr_ratio=args.get("loraplus_lr_ratio"),
        loraplus_unet_lr_ratio=args.get("loraplus_unet_lr_ratio"),
        loraplus_text_encoder_lr_ratio=args.get("loraplus_text_encoder_lr_ratio"),
        type_dims=type_dims if any(d is not None for d in type_dims) else None, in_dims=args.get("in_dims"),
        train_double_block_indices=args.get("train_double_block_indices"),
        train_single_block_indices=args.get("train_single_block_indices"),
        reg_dims=args.get("network_reg_dims"), reg_lrs=args.get("network_reg_lrs"), verbose=args.get("verbose", False),
    )


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any) -> tuple[FluxLoRANetwork, dict]:
    """A network shaped like a kohya FLUX file (its modules, ranks, alphas); returns (network, normalised weights).
    Nothing is loaded here (as in sd-scripts): call `load_weights` / `load_state_dict` after `apply_to`."""
    network, weights_sd = base._network_from_weights(
        FluxLoRANetwork, parse_flux_network_args, "this FLUX model (not a FLUX LoRA?)",
        multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs,
    )
    if network.unet_loras:
        first = next((m for m in network.unet_loras if not isinstance(m, FusedLoRAModule)), network.unet_loras[0])
        network.lora_dim, network.alpha = first.lora_dim, float(first.alpha)
    return network, weights_sd


__all__ = ["FluxLoRANetwork", "FusedLoRAModule", "create_network", "create_network_from_weights",
           "parse_flux_network_args", "text_encoder_targets", "transformer_targets"]
