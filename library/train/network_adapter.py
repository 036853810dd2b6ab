"""Trainable networks on the shared loop: kohya-style network modules (ours, LyCORIS, ...) and ControlNet-LLLite.

The loop only sees `TrainNetwork`: its parameter groups, a hook before each forward (LLLite sets the conditioning
image there, kohya modules get `on_step_start`), hooks at each epoch start and after each optimizer step, a hook
before each sample image, and saving/loading. Kohya modules are driven through networks/protocol.py only.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from library.config.train_config import RunConfig, parse_key_values
from library.errors import UserError
from library.families.interface import FamilyModels, SampleRequest
from networks import protocol

if TYPE_CHECKING:
    from library.data.dataset import Batch


class TrainNetwork(ABC):
    module: torch.nn.Module
    trains_text_encoder: bool = False
    file_kind: str = "network"

    @abstractmethod
    def param_groups(self, cfg: RunConfig) -> list[dict[str, Any]]:
        ...

    def before_forward(self, batch: Batch) -> None:
        """Called with each batch before the denoiser runs."""

    def on_epoch_start(self) -> None:
        """Called at the start of every epoch (the first included)."""

    def after_optimizer_step(self, device: torch.device) -> dict[str, float] | None:
        """Called after each optimizer step; may return values to log."""
        return None

    def before_sample(self, request: SampleRequest) -> None:
        """Called before each sample image is generated."""

    def after_sample(self) -> None:
        """Called after sampling, to restore training-time inputs."""


class KohyaNetwork(TrainNetwork):
    """Any module with sd-scripts' network interface (networks/protocol.py), called as sd-scripts' train_network.py
    calls it: the required members always, the optional ones (`on_step_start`, `apply_max_norm_regularization`,
    `prepare_network`) only when the network has them. Modules other than ours see the models as sd-scripts shows
    them (networks/model_views.py)."""

    def __init__(self, models: FamilyModels, cfg: RunConfig):
        ncfg = cfg.network
        self.module_name = ncfg.network_module
        mod = protocol.import_network_module(ncfg.network_module)
        kwargs = parse_key_values(ncfg.network_args, "--network_args")
        if ncfg.network_dim is None and not ncfg.network_weights:
            raise UserError("--network_dim is required (the LoRA rank), e.g. --network_dim 16")
        if ncfg.dim_from_weights and not ncfg.network_weights:
            raise UserError("--dim_from_weights takes the rank from --network_weights: give --network_weights FILE")
        text_encoders = models.text_encoders
        self.train_unet = not ncfg.network_train_text_encoder_only
        # with --cache_text_encoder_outputs the family decides what can still be cached while text encoders train
        # (library/train/text_cache_plan.py: FLUX caches T5 and runs CLIP-L every step; SDXL refuses)
        self.trains_text_encoder = not ncfg.network_train_unet_only and bool(text_encoders)
        self._text_encoders, self._denoiser = protocol.models_for(mod, text_encoders, models.denoiser)
        self._scale_weight_norms = getattr(ncfg, "scale_weight_norms", None)
        vae = models.vae
        if ncfg.network_dim is None or ncfg.dim_from_weights:
            # sd-scripts' --dim_from_weights (implied without --network_dim): the module shapes the network after the
            # file (ranks, alphas, modules); --network_dim / --network_alpha are then not used
            self.module, _ = mod.create_network_from_weights(1.0, ncfg.network_weights, vae, self._text_encoders,
                                                             self._denoiser, **kwargs)
        else:
            kwargs.setdefault("dropout", ncfg.network_dropout)  # sd-scripts passes it so for LyCORIS
            self.module = mod.create_network(1.0, ncfg.network_dim, ncfg.network_alpha, vae, self._text_encoders,
                                             self._denoiser, neuron_dropout=ncfg.network_dropout, **kwargs)
        if self.module is None:
            raise UserError(f"--network_module {ncfg.network_module}: create_network returned no network")
        protocol.check_network(self.module, ncfg.network_module)
        prepare = protocol.optional(self.module, "prepare_network")
        if prepare is not None:
            prepare(cfg)
        if self._scale_weight_norms and protocol.optional(self.module, "apply_max_norm_regularization") is None:
            print(f"--scale_weight_norms: {ncfg.network_module} does not support it; ignored")
            self._scale_weight_norms = None
        self.module.apply_to(self._text_encoders, self._denoiser, self.trains_text_encoder, self.train_unet)
        if ncfg.network_weights:
            info = self.module.load_weights(ncfg.network_weights)
            print(f"loaded network weights from {ncfg.network_weights}: {info}")
        if cfg.training.gradient_checkpointing:
            self.module.enable_gradient_checkpointing()
        self.module.prepare_grad_etc(self._text_encoders, self._denoiser)
        self._on_step_start = protocol.optional(self.module, "on_step_start")

    def param_groups(self, cfg: RunConfig) -> list[dict[str, Any]]:
        n = cfg.network
        groups = self.module.prepare_optimizer_params(n.text_encoder_lr, n.unet_lr, cfg.optimizer.learning_rate)
        groups = groups[0] if isinstance(groups, tuple) else groups
        # a module may hand out dict views or generators (LyCORIS does): the optimizer and checkpoints need lists
        return [dict(g, params=list(g["params"])) for g in groups]

    def before_forward(self, batch: Batch) -> None:
        if self._on_step_start is not None:
            self._on_step_start(self._text_encoders, self._denoiser)

    def on_epoch_start(self) -> None:
        self.module.on_epoch_start(self._text_encoders, self._denoiser)

    def after_optimizer_step(self, device: torch.device) -> dict[str, float] | None:
        if not self._scale_weight_norms:
            return None
        scaled, mean_norm, max_norm = self.module.apply_max_norm_regularization(self._scale_weight_norms, device)
        return {"max_norm/keys_scaled": float(scaled), "max_norm/average_key_norm": float(mean_norm),
                "max_norm/max_key_norm": float(max_norm)}


class LLLiteNetwork(TrainNetwork):
    """ControlNet-LLLite: conditioning image in, small modules on the U-Net's attention projections."""

    file_kind = "lllite"

    def __init__(self, models: FamilyModels, cfg: RunConfig):
        from networks import control_net_lllite as lllite

        n = cfg.network
        unet = models.denoiser
        if n.network_weights:
            self.module = lllite.create_network_from_weights(unet, n.network_weights, multiplier=1.0)
        else:
            self.module = lllite.create_network(unet, n.cond_emb_dim or 32, n.network_dim or 64,
                                                n.network_dropout or 0.0, 1.0)
        self.module.apply_to()
        self._train_cond: torch.Tensor | None = None

    def param_groups(self, cfg: RunConfig) -> list[dict[str, Any]]:
        lr = cfg.network.unet_lr or cfg.optimizer.learning_rate
        groups = self.module.prepare_optimizer_params(lr)
        return groups[0] if isinstance(groups, tuple) else groups

    def before_forward(self, batch: Batch) -> None:
        if batch.conditioning_images is None:
            raise UserError("ControlNet-LLLite training needs a ControlNet dataset: set conditioning_data_dir "
                            "in the dataset config's subsets")
        self.module.set_cond_image(batch.conditioning_images)

    def before_sample(self, request: SampleRequest) -> None:
        from library.data.images import load_image

        path = request.control_image
        if not path:
            self.module.set_cond_image(None)
            return
        import numpy as np
        import cv2

        rgb = load_image(path).rgb
        rgb = cv2.resize(rgb, (request.width, request.height), interpolation=cv2.INTER_AREA)
        t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255).unsqueeze(0)
        self.module.set_cond_image(t.to(next(self.module.parameters()).device))

    def after_sample(self) -> None:
        self.module.set_cond_image(None)


_TRAIN_NETWORKS: dict[str, type[TrainNetwork]] = {}


def register_train_network(kind: str, cls: type[TrainNetwork]) -> None:
    """A trainable network kind the scripts can ask for (`RunConfig.network_kind`)."""
    _TRAIN_NETWORKS[kind] = cls


register_train_network("lora", KohyaNetwork)  # any kohya network module (--network_module)
register_train_network("lllite", LLLiteNetwork)


def build_network(kind: str, models: FamilyModels, cfg: RunConfig) -> TrainNetwork:
    if kind not in _TRAIN_NETWORKS:
        raise UserError(f"unknown network kind {kind!r}; known: {sorted(_TRAIN_NETWORKS)}")
    return _TRAIN_NETWORKS[kind](models, cfg)
