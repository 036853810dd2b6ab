"""Optimizers and LR schedulers by the names sd-scripts users type."""
from __future__ import annotations

import ast
import importlib
from typing import Any, Callable

import torch

from library.config.train_config import OptimizerConfig, parse_key_values
from library.errors import UserError


def _literal(v: str) -> Any:
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def _bnb(name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(params, **kw):
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
            raise UserError(f"optimizer {name} needs bitsandbytes: pip install bitsandbytes ({e})") from None
        return getattr(bnb.optim, name)(params, **kw)
    return make


def _prodigy(params, **kw):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("optimizer Prodigy needs the prodigyopt package: pip install prodigyopt") from None
    return Prodigy(params, **kw)


def _adafactor(params, **kw):
    from transformers.optimization import Adafactor

    kw.setdefault("scale_parameter", False)
    kw.setdefault("relative_step", False)
    kw.setdefault("warmup_init", False)
    return Adafactor(params, **kw)


def _sgd_nesterov(params, **kw):
    kw.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, nesterov=True, **kw)


def _lion(params, **kw):
    return _bnb("Lion")(params, **kw)


# sd-scripts' optimizer_type names (compared lower-case)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "adamw8bit": _bnb("AdamW8bit"),
    "pagedadamw8bit": _bnb("PagedAdamW8bit"),
    "lion": _lion,
    "lion8bit": _bnb("Lion8bit"),
    "prodigy": _prodigy,
    "adafactor": _adafactor,
    "sgdnesterov": _sgd_nesterov,
    "sgd": torch.optim.SGD,
}


def _import_class(path: str) -> Callable[..., torch.optim.Optimizer]:
    module_name, _, cls_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--optimizer_type {path}: cannot import it ({e})") from None


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    param_groups = [dict(g, params=list(g["params"])) for g in param_groups]
    if not any(g["params"] for g in param_groups):
        raise UserError("no trainable parameters: every learning rate is 0 (--learning_rate, --unet_lr, "
                        "--text_encoder_lr) or the network targets no module")
    kwargs = {k: _literal(v) for k, v in parse_key_values(cfg.optimizer_args, "--optimizer_args").items()}
    name = cfg.optimizer_type
    factory = OPTIMIZERS.get(name.lower())
    if factory is None:
        if "." not in name:
            raise UserError(f"unknown --optimizer_type {name!r}; known: {sorted(OPTIMIZERS)} or a module.Class path")
        factory = _import_class(name)
    try:
        return factory(param_groups, lr=cfg.learning_rate, **kwargs)
    except TypeError as e:
        raise UserError(f"--optimizer_args for {name}: {e}") from None


SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int):
    from diffusers.optimization import get_scheduler

    if cfg.lr_scheduler not in SCHEDULERS:
        raise UserError(f"unknown --lr_scheduler {cfg.lr_scheduler!r}; known: {list(SCHEDULERS)}")
    warmup = cfg.lr_warmup_steps
    warmup_steps = int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)
    name = cfg.lr_scheduler
    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power)
