"""LoRA / LoCon for SDXL in kohya's file layout, with sd-scripts' network-module interface.

`--network_module networks.lora` finds `create_network` / `create_network_from_weights` here, as users of sd-scripts
expect. Files are interchangeable with sd-scripts, ComfyUI, A1111 and diffusers' `load_lora_weights`: module names are
`lora_unet_<SGM path>` (the U-Net runs as diffusers' `UNet2DConditionModel`, names are translated to the SGM layout of
the published checkpoints) and `lora_te1_text_model_...` / `lora_te2_text_model_...` for the text encoders.

Each `LoRAModule` keeps the wrapped layer and replaces only its `forward`, so the base model's own state dict is
untouched (checkpoints of the base model keep their names) and removing the network restores the model exactly.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
from torch import nn

from library.errors import ConfigError, ModelLoadError
from library.fileio import atomic_path, save_safetensors_atomic
from library.models.sdxl_unet_names import diffusers_to_sgm
from networks import kohya_names as kn
from networks.block_args import BLOCK_ARGS, BLOCK_DIM_KEYS, BlockSettings, parse_block_lr_weights, parse_block_settings
from networks.kinds import NetworkKind, get_network_kind
from networks.kohya_metadata import (  # re-exported: callers import these from networks.lora
    SDXL_BASE_MODEL_VERSION,  # noqa: F401
    build_ss_metadata,
    metadata_strings,
    precalculate_safetensors_hashes,
    ss_metadata_for_save,
)
from networks.lora_modules import LoRAModule  # re-exported: the layer module of the "lora" kind
from networks.targets import (
    LORA_PREFIX_UNET,
    TEXT_ENCODER_TARGET_CONTAINERS,
    UNET_CONV_CONTAINERS,
    UNET_TARGET_CONTAINERS,
)

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.lora"
# We take our diffusers models as they are (names are translated here); see networks/protocol.py.
NATIVE_MODELS = True


# --------------------------------------------------------------------------------------------------------------------
# Finding the layers to wrap
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRATarget:
    """One layer to wrap: its published name, the layer, and whether it takes the conv rank (kxk conv, k > 1)."""

    name: str
    module: nn.Module
    is_conv_kxk: bool


def _wrappable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _is_kxk_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def find_targets(root: nn.Module, containers: Iterable[str], name_of: Callable[[str], str]) -> list[LoRATarget]:
    """Every Linear/Conv2d inside a module whose class name is in `containers`, named by `name_of(path)`."""
    containers = tuple(containers)
    found: dict[str, LoRATarget] = {}
    for path, module in root.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_path, child in module.named_modules():
            if not child_path or not _wrappable(child):
                continue
            full = f"{path}.{child_path}" if path else child_path
            name = name_of(full)
            found.setdefault(name, LoRATarget(name, child, _is_kxk_conv(child)))
    return list(found.values())


def _unet_name(path: str) -> str:
    try:
        return kn.lora_name(LORA_PREFIX_UNET, diffusers_to_sgm(path))
    except KeyError:
        raise ModelLoadError(
            f"U-Net module '{path}' has no SDXL (SGM) name: networks.lora expects an SDXL-layout "
            "UNet2DConditionModel (three levels, two layers per block)"
        ) from None


def _text_encoder_list(text_encoder: Any) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [te for te in text_encoder if te is not None]
    return [text_encoder]


def collect_targets(
    text_encoders: Sequence[nn.Module], unet: nn.Module | None, include_conv: bool
) -> tuple[list[LoRATarget], list[LoRATarget]]:
    """(text-encoder targets, U-Net targets) in the published naming."""
    te_targets: list[LoRATarget] = []
    several = len(text_encoders) > 1
    for i, te in enumerate(text_encoders):
        prefix = kn.text_encoder_prefix(i + 1 if several else None)
        te_targets += find_targets(te, TEXT_ENCODER_TARGET_CONTAINERS,
                                   lambda p, prefix=prefix: kn.lora_name(prefix, kn.published_clip_path(p)))
    unet_targets: list[LoRATarget] = []
    if unet is not None:
        containers = UNET_TARGET_CONTAINERS + (UNET_CONV_CONTAINERS if include_conv else ())
        unet_targets = find_targets(unet, containers, _unet_name)
    return te_targets, unet_targets


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------


def load_weights_file(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a LoRA file (.safetensors, or a torch pickle of tensors)."""
    path = os.fspath(file)
    if not os.path.isfile(path):
        raise ModelLoadError(f"LoRA file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            with safetensors.safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
            return sd, metadata
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except Exception as e:  # corrupt or foreign file: one clear message
        raise ModelLoadError(f"{path}: cannot read it as a LoRA file ({e})") from None
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    return sd, {}


def save_state_dict_file(
    state_dict: Mapping[str, torch.Tensor], file: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> None:
    """Write atomically (temp file + os.replace), so a crash never leaves a half-written LoRA behind.

    `.safetensors` files get the `sshs_*` hashes added to their metadata; other extensions are torch pickles
    without metadata (as sd-scripts writes them).
    """
    path = os.fspath(file)
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        meta = metadata_strings(metadata)
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, meta)
        save_safetensors_atomic(tensors, path, meta)
    else:
        with atomic_path(path) as tmp:
            torch.save(tensors, tmp)


# --------------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadInfo:
    """What `load_weights` matched: printed by the trainer, so it reads as one line."""

    loaded: int
    missing: list[str] = field(default_factory=list)  # modules of this network absent from the file
    unexpected: list[str] = field(default_factory=list)  # modules in the file that this network does not have

    def __str__(self) -> str:
        def few(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

        text = f"{self.loaded} modules loaded"
        if self.missing:
            text += f"; {len(self.missing)} not in the file: {few(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} in the file but not in this network: {few(self.unexpected)}"
        return text


def _module_names(keys: Iterable[str]) -> list[str]:
    return sorted({kn.split_key(k)[0] for k in keys})


class LoRANetwork(nn.Module):
    """All LoRA modules of one SDXL model (both text encoders and the U-Net), in sd-scripts' network interface.

    Modules are registered under their published names, so `state_dict()` is exactly the file layout.
    `modules_dim` / `modules_alpha` (from a file) restrict the network to those modules with those ranks.
    """

    def __init__(
        self,
        text_encoders: Any,
        unet: nn.Module | None,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float] | None = None,
        loraplus_lr_ratio: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
        kind: str | NetworkKind = "lora",
        blocks: BlockSettings | None = None,
    ):
        super().__init__()
        self.kind = kind if isinstance(kind, NetworkKind) else get_network_kind(kind)
        self.multiplier = float(multiplier)
        self.lora_dim = int(lora_dim)
        self.alpha = float(alpha)
        self.conv_lora_dim = int(conv_lora_dim) if conv_lora_dim else None
        self.conv_alpha = float(conv_alpha) if conv_alpha is not None else None
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        # block-wise network_args (networks/block_args.py): U-Net ranks per block here, lr weights in the optimizer
        self.blocks = blocks if modules_dim is None else None
        self.block_lr_weight: list[float] | None = blocks.lr_weights if blocks is not None else None

        tes = _text_encoder_list(text_encoders)
        include_conv = (modules_dim is not None or self.conv_lora_dim is not None
                        or (self.blocks is not None and self.blocks.conv_dims is not None))
        te_targets, unet_targets = collect_targets(tes, unet, include_conv)
        self.text_encoder_loras: list[LoRAModule] = self._make_modules(te_targets, modules_dim, modules_alpha)
        self.unet_loras: list[LoRAModule] = self._make_modules(unet_targets, modules_dim, modules_alpha, self.blocks)
        self.unmatched_names: list[str] = []
        if modules_dim is not None:
            made = {m.lora_name for m in self.text_encoder_loras + self.unet_loras}
            self.unmatched_names = sorted(set(modules_dim) - made)
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)
        logger.info("LoRA: %d text-encoder modules, %d U-Net modules", len(self.text_encoder_loras),
                    len(self.unet_loras))

    def _make_modules(
        self,
        targets: list[LoRATarget],
        modules_dim: Mapping[str, int] | None,
        modules_alpha: Mapping[str, float] | None,
        blocks: BlockSettings | None = None,
    ) -> list[LoRAModule]:
        loras = []
        for t in targets:
            if modules_dim is not None:
                if t.name not in modules_dim:
                    continue
                dim = modules_dim[t.name]
                alpha = (modules_alpha or {}).get(t.name, dim)
            elif blocks is not None:  # sd-scripts' block_dims & co.: the rank of the module's block (0 = none)
                i = kn.sdxl_block_index(t.name)
                if not t.is_conv_kxk:
                    dim, alpha = blocks.dims[i], blocks.alphas[i]
                elif blocks.conv_dims is not None and blocks.conv_alphas is not None:
                    dim, alpha = blocks.conv_dims[i], blocks.conv_alphas[i]
                else:
                    continue
            elif t.is_conv_kxk:
                if not self.conv_lora_dim:
                    continue
                dim, alpha = self.conv_lora_dim, self.conv_alpha
            else:
                dim, alpha = self.lora_dim, self.alpha
            if not dim:
                continue
            loras.append(self.kind.module_class(t.name, t.module, self.multiplier, dim, alpha, self.dropout,
                                                self.rank_dropout, self.module_dropout))
        return loras

    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    # ---- applying ----------------------------------------------------------------------------------------------

    def apply_to(self, text_encoders: Any = None, unet: Any = None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Hook the modules into the models they were built from; modules not applied are dropped (not saved)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.loras:
            lora.apply_to()

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def restore(self) -> None:
        """Unhook every module: the models behave as if the network never existed."""
        for lora in self.loras:
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.loras:
            lora.multiplier = self.multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the modules run inside the base model's (checkpointed) blocks."""

    def prepare_grad_etc(self, text_encoder: Any, unet: Any) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any, unet: Any) -> None:
        self.train()

    def on_step_start(self, text_encoder: Any, unet: Any) -> None:
        """Nothing to do per step (kept for the trainer's hook)."""

    def get_trainable_params(self) -> Iterable[nn.Parameter]:
        return self.parameters()

    # ---- optimizer ---------------------------------------------------------------------------------------------

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Parameter groups per text encoder and for the U-Net, with LoRA+ groups for `lora_up` when enabled.

        `text_encoder_lr` may be one value or one per text encoder; a missing value falls back to `default_lr`, and a
        group whose learning rate ends up 0 or None is left out (frozen), as in sd-scripts.
        """
        if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 0):
            te_lrs: list[float | None] = [default_lr]
        elif isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = list(text_encoder_lr)
        else:
            te_lrs = [text_encoder_lr]
        unet_lr = default_lr if unet_lr is None else unet_lr

        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []

        def add(loras: list[LoRAModule], lr: float | None, plus_ratio: float | None, description: str) -> None:
            named = [(n, p) for lora in loras for n, p in lora.named_parameters()]
            plain = [p for n, p in named if plus_ratio is None or "lora_up" not in n]
            plus = [p for n, p in named if plus_ratio is not None and "lora_up" in n]
            for params, factor, suffix in ((plain, 1.0, ""), (plus, plus_ratio, " plus")):
                if not params or lr is None or lr == 0:
                    continue
                groups.append({"params": params, "lr": lr * factor})
                descriptions.append(description + suffix)

        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        by_prefix: dict[str, list[LoRAModule]] = {}
        for lora in self.text_encoder_loras:
            by_prefix.setdefault(lora.lora_name.split("_")[1], []).append(lora)  # te, te1, te2
        for i, prefix in enumerate(sorted(by_prefix)):
            lr = te_lrs[i] if i < len(te_lrs) else te_lrs[0]
            lr = default_lr if lr is None else lr
            label = "textencoder" if prefix == "te" else f"textencoder {prefix[2:]}"
            add(by_prefix[prefix], lr, te_ratio, label)
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        if self.block_lr_weight is None:
            add(self.unet_loras, unet_lr, unet_ratio, "unet")
        else:  # one group per block, its lr scaled by the block's weight (a weight of 0 freezes the block)
            by_block: dict[int, list[LoRAModule]] = {}
            for lora in self.unet_loras:
                by_block.setdefault(kn.sdxl_block_index(lora.lora_name), []).append(lora)
            for i in sorted(by_block):
                weight = self.block_lr_weight[i] if 0 <= i < len(self.block_lr_weight) else 1.0
                add(by_block[i], None if unet_lr is None else unet_lr * weight, unet_ratio, f"unet_block{i}")
        return groups, descriptions

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: torch.device | str
    ) -> tuple[int, float, float]:
        """Scale down modules whose update norm exceeds `max_norm_value` (sd-scripts' --scale_weight_norms).

        Returns (modules scaled, mean norm after scaling, max norm after scaling).
        """
        scaled, norms = 0, []
        for lora in self.loras:
            norm = lora.delta_weight().to(device).norm().clamp(min=max_norm_value / 2)
            desired = norm.clamp(max=max_norm_value)
            ratio = (desired / norm).item()
            if ratio != 1.0:
                scaled += 1
                root = math.sqrt(ratio)
                lora.lora_down.weight.mul_(root)
                lora.lora_up.weight.mul_(root)
            norms.append(norm.item() * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # ---- weights -----------------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Accept both spellings of text-encoder names (transformers 4 and 5)."""
        return super().load_state_dict(kn.prepare_for_loading(state_dict), strict=strict, assign=assign)

    def load_weights(self, file: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = False) -> LoadInfo:
        """Load a kohya file (or state dict) into this network.

        A shape mismatch always fails with the module name; modules present on one side only are reported (and fail
        with `strict=True`): e.g. a file with text-encoder modules loaded into a U-Net-only network.
        """
        source = "state dict" if isinstance(file, Mapping) else os.fspath(file)
        sd = dict(file) if isinstance(file, Mapping) else load_weights_file(file)[0]
        sd = kn.prepare_for_loading(sd)
        own = self.state_dict()
        for key, value in sd.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise ModelLoadError(
                    f"{source}: '{key}' has shape {tuple(value.shape)}, this network expects {tuple(own[key].shape)} "
                    "(different network_dim / conv_dim?)"
                )
        result = super().load_state_dict(sd, strict=False)
        info = LoadInfo(
            loaded=len(set(_module_names(own)) - set(_module_names(result.missing_keys))),
            missing=_module_names(result.missing_keys),
            unexpected=_module_names(result.unexpected_keys),
        )
        if info.missing or info.unexpected:
            if strict:
                raise ModelLoadError(f"{source}: the file does not match this network: {info}")
            logger.warning("%s: %s", source, info)
        return info

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Write `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (atomically)."""
        sd = {k: v.detach().to("cpu", dtype or v.dtype).clone() for k, v in self.state_dict().items()}
        save_state_dict_file(sd, file, metadata)

    @torch.no_grad()
    def merge_to(self, text_encoders: Any = None, unet: Any = None,
                 weights_sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> int:
        """Merge the update of every module into its base layer's weight; returns the number of modules merged.

        With `weights_sd`, only the modules named in it are loaded and merged. Merged modules are unhooked, so the
        model's output is the same as with the network applied (up to rounding in the base weights' dtype).
        `dtype` is accepted for sd-scripts compatibility; merging always computes in float32.
        """
        if weights_sd is not None:
            weights_sd = kn.prepare_for_loading(weights_sd)
            self.load_weights(weights_sd)
            names = set(_module_names(weights_sd))
            loras = [lora for lora in self.loras if lora.lora_name in names]
        else:
            loras = self.loras
        for lora in loras:
            lora.merge_into_org(self.multiplier, device)
        return len(loras)


# --------------------------------------------------------------------------------------------------------------------
# sd-scripts' module-level entry points
# --------------------------------------------------------------------------------------------------------------------

_FLOAT_ARGS = ("conv_alpha", "rank_dropout", "module_dropout", "dropout", "loraplus_lr_ratio",
               "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_INT_ARGS = ("conv_dim",)


def _parse_network_args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Typed values of `--network_args key=value` strings; a bad value names the argument."""
    out: dict[str, Any] = {}
    for key, raw in kwargs.items():
        if raw is None:
            continue
        if key in BLOCK_ARGS:  # parsed with the network's dims (networks/block_args.py)
            out[key] = raw
        elif key in _INT_ARGS or key in _FLOAT_ARGS:
            try:
                value = float(raw)
                if key in _INT_ARGS:
                    if value != int(value):
                        raise ValueError
                    value = int(value)
            except (TypeError, ValueError):
                kind = "an integer" if key in _INT_ARGS else "a number"
                raise ConfigError(f"expected {kind}, got {raw!r}", table="--network_args", key=key) from None
            if key.endswith("dropout") and not 0.0 <= value < 1.0:
                raise ConfigError(f"expected a probability in [0, 1), got {raw!r}", table="--network_args", key=key)
            out[key] = value
        else:
            logger.warning("--network_args: '%s' is not used by %s", key, NETWORK_MODULE)
    return out


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """A fresh network (sd-scripts' entry point). `kwargs` are `--network_args` strings: conv_dim, conv_alpha,
    rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio, and the
    block-wise block_dims, block_alphas, conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight,
    up_lr_weight, block_lr_zero_threshold (networks/block_args.py)."""
    args = _parse_network_args(kwargs)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = args.get("conv_dim")
    conv_alpha = args.get("conv_alpha", 1.0 if conv_dim else None)
    blocks = parse_block_settings(args, network_dim, network_alpha, conv_dim, conv_alpha)
    return LoRANetwork(
        text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
        dropout=neuron_dropout if neuron_dropout is not None else args.get("dropout"),
        rank_dropout=args.get("rank_dropout"), module_dropout=args.get("module_dropout"),
        conv_lora_dim=conv_dim, conv_alpha=conv_alpha,
        loraplus_lr_ratio=args.get("loraplus_lr_ratio"),
        loraplus_unet_lr_ratio=args.get("loraplus_unet_lr_ratio"),
        loraplus_text_encoder_lr_ratio=args.get("loraplus_text_encoder_lr_ratio"),
        blocks=blocks,
    )


def _network_from_weights(
    network_cls: type[LoRANetwork],
    parse_args: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    family_label: str,
    multiplier: float,
    file: str | os.PathLike | None,
    text_encoder: Any,
    unet: nn.Module,
    weights_sd: Mapping[str, torch.Tensor] | None,
    for_inference: bool,
    kwargs: Mapping[str, Any],
    kind_name: str = "lora",
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The model-family-independent half of `create_network_from_weights` (SDXL here, FLUX in lora_flux).

    Shapes `network_cls` after a kohya file: ranks and alphas come from the weights, training-only args from
    `parse_args(kwargs)` (dropouts are dropped for inference). `family_label` completes the "modules exist in ..."
    error, so a user who loads a LoRA for the wrong model family is told which family was expected.
    """
    if weights_sd is None:
        if file is None:
            raise ModelLoadError("create_network_from_weights needs a file or weights_sd")
        weights_sd = load_weights_file(file)[0]
    source = os.fspath(file) if file is not None else "LoRA state dict"
    weights_sd = kn.prepare_for_loading(weights_sd)
    kind = get_network_kind(kind_name)
    modules_dim, modules_alpha = kind.read_shapes(weights_sd)
    if not modules_dim:
        raise ModelLoadError(f"{source}: no '*.{kind.tensor_keys[0]}' tensors: not a kohya {kind.name} file")
    args = parse_args(kwargs)
    network = network_cls(
        text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha, kind=kind,
        dropout=None if for_inference else args.get("dropout"),
        rank_dropout=None if for_inference else args.get("rank_dropout"),
        module_dropout=None if for_inference else args.get("module_dropout"),
    )
    if network.unmatched_names:
        if not network.loras:
            raise ModelLoadError(
                f"{source}: none of its {len(modules_dim)} modules exist in {family_label}, "
                f"e.g. {network.unmatched_names[0]}"
            )
        logger.warning("%s: %d modules have no matching layer and are ignored, e.g. %s", source,
                       len(network.unmatched_names), ", ".join(network.unmatched_names[:3]))
    return network, weights_sd


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a kohya file: its modules, ranks and alphas. Returns (network, normalised weights).

    The weights are returned with published names (transformers-5 text-encoder names rewritten), ready for
    `network.load_state_dict` after `apply_to`. Nothing is loaded into the network here (as in sd-scripts).
    """
    network, weights_sd = _network_from_weights(
        LoRANetwork, _parse_network_args, "this model (not an SDXL LoRA?)",
        multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs,
    )
    # Record the dominant linear / conv ranks, for metadata and for continuing training with the same settings.
    lin = [m for m in network.unet_loras + network.text_encoder_loras if m.lora_down.weight.dim() == 2
           or m.lora_down.weight.shape[2:] == (1, 1)]
    conv = [m for m in network.unet_loras if m.lora_down.weight.dim() == 4 and m.lora_down.weight.shape[2:] != (1, 1)]
    if lin:
        network.lora_dim, network.alpha = lin[0].lora_dim, float(lin[0].alpha)
    if conv:
        network.conv_lora_dim, network.conv_alpha = conv[0].lora_dim, float(conv[0].alpha)
    # block lr weights still scale the learning rates (--dim_from_weights); ranks are the file's
    network.block_lr_weight = parse_block_lr_weights(kwargs)
    ignored = [k for k in BLOCK_DIM_KEYS if kwargs.get(k) is not None]
    if ignored:
        logger.warning("--network_args %s: ignored, the ranks and alphas come from the weights file",
                       ", ".join(ignored))
    return network, weights_sd


def merge_lora_state_dict_into(
    text_encoders: Any,
    unet: nn.Module,
    weights_sd: Mapping[str, torch.Tensor],
    multiplier: float = 1.0,
    device: torch.device | str | None = None,
) -> int:
    """Merge a kohya LoRA state dict into the models' weights (generation's --network_merge); returns modules merged."""
    network, sd = create_network_from_weights(multiplier, None, None, text_encoders, unet, weights_sd=weights_sd,
                                              for_inference=True)
    return network.merge_to(text_encoders, unet, sd, device=device)


__all__ = [
    "LoRAModule", "LoRANetwork", "LoadInfo", "LoRATarget", "build_ss_metadata", "collect_targets",
    "create_network", "create_network_from_weights", "find_targets", "load_weights_file",
    "merge_lora_state_dict_into", "precalculate_safetensors_hashes", "save_state_dict_file", "ss_metadata_for_save",
]
