"""Trainable networks on the shared loop: kohya-style network modules (LoRA/LoCon) and ControlNet-LLLite.

The loop only sees `TrainNetwork`: its parameter groups, a hook before each forward (LLLite sets the conditioning
image there), a hook before each sample image, and saving/loading.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

import torch

from library.config.train_config import RunConfig, parse_key_values
from library.errors import UserError


class TrainNetwork(ABC):
    module: torch.nn.Module
    trains_text_encoder: bool = False
    file_kind: str = "network"

    @abstractmethod
    def param_groups(self, cfg: RunConfig) -> list[dict[str, Any]]:
        ...

    def before_forward(self, batch: Any) -> None:
        """Called with each batch before the denoiser runs."""

    def before_sample(self, request: Any) -> None:
        """Called before each sample image is generated."""

    def after_sample(self) -> None:
        """Called after sampling, to restore training-time inputs."""


class KohyaNetwork(TrainNetwork):
    """Any module with sd-scripts' network interface (`create_network`, `apply_to`, `prepare_optimizer_params`)."""

    def __init__(self, models: dict[str, Any], cfg: RunConfig, denoiser_key: str):
        ncfg = cfg.network
        try:
            mod = importlib.import_module(ncfg.network_module)
        except ImportError as e:
            raise UserError(f"--network_module {ncfg.network_module}: cannot import it ({e})") from None
        kwargs = parse_key_values(ncfg.network_args, "--network_args")
        if ncfg.network_dim is None and not ncfg.network_weights:
            raise UserError("--network_dim is required (the LoRA rank), e.g. --network_dim 16")
        text_encoders = models.get("text_encoders") or []
        self.train_unet = not ncfg.network_train_text_encoder_only
        self.trains_text_encoder = not ncfg.network_train_unet_only and bool(text_encoders)
        if cfg.cache.cache_text_encoder_outputs and self.trains_text_encoder:
            raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only: "
                            "cached outputs cannot train a text-encoder LoRA")
        dim = ncfg.network_dim
        if dim is None:  # continuing from weights without a dim: take it from the file
            _, sd = mod.create_network_from_weights(1.0, ncfg.network_weights, models.get("vae"), text_encoders,
                                                    models[denoiser_key], for_inference=False, **kwargs)
            dim = next(int(v.shape[0]) for k, v in sd.items() if k.endswith("lora_down.weight"))
        self.module = mod.create_network(1.0, dim, ncfg.network_alpha, models.get("vae"), text_encoders,
                                         models[denoiser_key], neuron_dropout=ncfg.network_dropout, **kwargs)
        self.module.apply_to(text_encoders, models[denoiser_key], self.trains_text_encoder, self.train_unet)
        if ncfg.network_weights:
            info = self.module.load_weights(ncfg.network_weights)
            print(f"loaded network weights from {ncfg.network_weights}: {info}")

    def param_groups(self, cfg: RunConfig) -> list[dict[str, Any]]:
        n = cfg.network
        groups = self.module.prepare_optimizer_params(n.text_encoder_lr, n.unet_lr, cfg.optimizer.learning_rate)
        return groups[0] if isinstance(groups, tuple) else groups


class LLLiteNetwork(TrainNetwork):
    """ControlNet-LLLite: conditioning image in, small modules on the U-Net's attention projections."""

    file_kind = "lllite"

    def __init__(self, models: dict[str, Any], cfg: RunConfig, denoiser_key: str):
        from networks import control_net_lllite as lllite

        n = cfg.network
        unet = models[denoiser_key]
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

    def before_forward(self, batch: Any) -> None:
        if batch.conditioning_images is None:
            raise UserError("ControlNet-LLLite training needs a ControlNet dataset: set conditioning_data_dir "
                            "in the dataset config's subsets")
        self.module.set_cond_image(batch.conditioning_images)

    def before_sample(self, request: Any) -> None:
        from library.data.images import load_image

        path = (request.extras or {}).get("control_image")
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


NETWORK_KINDS = {"lora": KohyaNetwork, "lllite": LLLiteNetwork}


def build_network(kind: str, models: dict[str, Any], cfg: RunConfig, denoiser_key: str) -> TrainNetwork:
    if kind not in NETWORK_KINDS:
        raise UserError(f"unknown network kind {kind!r}; known: {sorted(NETWORK_KINDS)}")
    return NETWORK_KINDS[kind](models, cfg, denoiser_key)
