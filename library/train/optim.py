"""Optimizers and LR schedulers by the names sd-scripts users type (`--optimizer_type`, `--lr_scheduler`)."""
from __future__ import annotations

import ast
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from library.config.train_config import OptimizerConfig, parse_key_values
from library.errors import UserError

logger = logging.getLogger(__name__)


def _literal(v: str) -> Any:
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def _package(module: str, pip_name: str, what: str) -> Any:
    """Import an optional optimizer package, or say which pip command gets it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--optimizer_type {what} needs the {pip_name} package: pip install {pip_name}") from None


def _bnb(name: str, **fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(params, **kw):
        bnb = _package("bitsandbytes", "bitsandbytes", name)
        return getattr(bnb.optim, name)(params, **fixed, **kw)
    return make


def _with_momentum(kw: dict[str, Any]) -> dict[str, Any]:
    # Nesterov needs momentum; sd-scripts sets 0.9 when none is given
    kw.setdefault("momentum", 0.9)
    return kw


def _sgd_nesterov(params, **kw):
    return torch.optim.SGD(params, nesterov=True, **_with_momentum(kw))


def _sgd_nesterov_8bit(params, **kw):
    return _bnb("SGD8bit", nesterov=True)(params, **_with_momentum(kw))


def _prodigy(params, **kw):
    return _package("prodigyopt", "prodigyopt", "Prodigy").Prodigy(params, **kw)


def _dadapt(cls_name: str, experimental: bool = False) -> Callable[..., torch.optim.Optimizer]:
    def make(params, **kw):
        module = "dadaptation.experimental" if experimental else "dadaptation"
        _package("dadaptation", "dadaptation", cls_name)
        return getattr(importlib.import_module(module), cls_name)(params, **kw)
    return make


def _schedule_free(cls_name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(params, **kw):
        opt = getattr(_package("schedulefree", "schedulefree", cls_name), cls_name)(params, **kw)
        opt.train()  # a schedule-free optimizer steps only in train mode; saving and sampling switch to eval
        return opt
    return make


def _adafactor(params, **kw):
    from transformers.optimization import Adafactor

    return Adafactor(params, **kw)


# sd-scripts' optimizer_type names, compared lower-case; names ending in 8bit, DAdapt* and *ScheduleFree as its list
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "adamw8bit": _bnb("AdamW8bit"),
    "pagedadamw": _bnb("PagedAdamW"),
    "pagedadamw8bit": _bnb("PagedAdamW8bit"),
    "pagedadamw32bit": _bnb("PagedAdamW32bit"),
    "lion": _bnb("Lion"),  # 32-bit Lion (sd-scripts takes it from lion-pytorch: the same update rule)
    "lion8bit": _bnb("Lion8bit"),
    "pagedlion8bit": _bnb("PagedLion8bit"),
    "ademamix8bit": _bnb("AdEMAMix8bit"),
    "pagedademamix8bit": _bnb("PagedAdEMAMix8bit"),
    "sgdnesterov": _sgd_nesterov,
    "sgdnesterov8bit": _sgd_nesterov_8bit,
    "dadaptation": _dadapt("DAdaptAdamPreprint", experimental=True),
    "dadaptadampreprint": _dadapt("DAdaptAdamPreprint", experimental=True),
    "dadaptadagrad": _dadapt("DAdaptAdaGrad"),
    "dadaptadam": _dadapt("DAdaptAdam"),
    "dadaptadan": _dadapt("DAdaptAdan"),
    "dadaptadanip": _dadapt("DAdaptAdanIP", experimental=True),
    "dadaptlion": _dadapt("DAdaptLion"),
    "dadaptsgd": _dadapt("DAdaptSGD"),
    "prodigy": _prodigy,
    "adafactor": _adafactor,
    "adamwschedulefree": _schedule_free("AdamWScheduleFree"),
    "radamschedulefree": _schedule_free("RAdamScheduleFree"),
    "sgdschedulefree": _schedule_free("SGDScheduleFree"),
}


def optimizer_name(cfg: OptimizerConfig) -> str:
    """The optimizer type after the old spellings (--use_8bit_adam, --use_lion_optimizer); empty means AdamW."""
    name = cfg.optimizer_type if cfg.optimizer_type not in (None, "AdamW") else ""
    if cfg.use_8bit_adam or cfg.use_lion_optimizer:
        old = "--use_8bit_adam" if cfg.use_8bit_adam else "--use_lion_optimizer"
        if cfg.use_8bit_adam and cfg.use_lion_optimizer:
            raise UserError("--use_8bit_adam and --use_lion_optimizer both given: keep one (or use --optimizer_type)")
        if name:
            raise UserError(f"{old} and --optimizer_type {name} both given: {old} is the old spelling of "
                            "--optimizer_type; keep one")
        return "AdamW8bit" if cfg.use_8bit_adam else "Lion"
    return name or "AdamW"


def is_schedule_free(cfg: OptimizerConfig) -> bool:
    return optimizer_name(cfg).lower().endswith("schedulefree")


def uses_adafactor_relative_step(cfg: OptimizerConfig) -> bool:
    """Adafactor computes its own step size unless optimizer_args says relative_step=False (sd-scripts' default);
    warmup_init=True forces it on."""
    if optimizer_name(cfg).lower() != "adafactor":
        return False
    kw = {k: _literal(v) for k, v in parse_key_values(cfg.optimizer_args, "--optimizer_args").items()}
    return bool(kw.get("relative_step", True) or kw.get("warmup_init", False))


def set_schedule_free_mode(optimizer: Any, train: bool) -> None:
    """Schedule-free optimizers keep two weight sequences: training steps on one, the averaged one is what is saved
    and sampled. `optimizer.eval()` swaps the averaged weights in, `.train()` swaps back; other optimizers have
    neither and are left alone. Accepts accelerate's wrapper too."""
    inner = getattr(optimizer, "optimizer", optimizer)
    method = getattr(inner, "train" if train else "eval", None)
    if callable(method) and "train_mode" in (inner.param_groups[0] if inner.param_groups else {}):
        method()


def _import_class(path: str, default_module: Any, flag: str) -> Callable[..., Any]:
    """sd-scripts' rule for free class names: a dotted path is module.Class, a bare name is taken from torch."""
    module_name, _, cls_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else default_module
        return getattr(module, cls_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{flag} {path}: cannot import it ({e})") from None


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    param_groups = [dict(g, params=list(g["params"])) for g in param_groups]
    if not any(g["params"] for g in param_groups):
        raise UserError("no trainable parameters: every learning rate is 0 (--learning_rate, --unet_lr, "
                        "--text_encoder_lr) or the network targets no module")
    kwargs = {k: _literal(v) for k, v in parse_key_values(cfg.optimizer_args, "--optimizer_args").items()}
    name = optimizer_name(cfg)
    key = name.lower()
    lr: float | None = cfg.learning_rate
    if key.startswith("dadapt") or key == "prodigy":
        first = next((g.get("lr", lr) for g in param_groups if g["params"]), lr)
        if first is not None and first <= 0.1:
            logger.warning("--optimizer_type %s adapts the step size itself: a learning rate around 1.0 is "
                           "recommended (got %s)", name, first)
    if key == "adafactor":
        if kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True
        kwargs.setdefault("relative_step", True)
        if kwargs["relative_step"]:
            # the optimizer picks its own step size; the learning rate only seeds the adafactor schedule
            lr = None
            param_groups = [{k: v for k, v in g.items() if k not in ("lr", "initial_lr")} for g in param_groups]
    factory = OPTIMIZERS.get(key)
    if factory is None:
        if key.endswith("schedulefree"):
            raise UserError(f"unknown schedule-free optimizer {name!r}: AdamWScheduleFree, RAdamScheduleFree or "
                            "SGDScheduleFree")
        if "." not in name and not hasattr(torch.optim, name):
            raise UserError(f"unknown --optimizer_type {name!r}; known: {', '.join(sorted(OPTIMIZERS))}, a "
                            "torch.optim class name or a module.ClassName path")
        factory = _import_class(name, torch.optim, "--optimizer_type")
    if key == "adamw" and not {"fused", "foreach"} & set(kwargs) and all(
            p.is_cuda for g in param_groups for p in g["params"]):
        # one fused kernel per step, and it can skip a non-finite step on the GPU without a host sync
        # (library/train/readback.py); the CPU keeps torch's default (the stored loss values come from it)
        kwargs["fused"] = True
    try:
        return factory(param_groups, lr=lr, **kwargs)
    except TypeError as e:
        raise UserError(f"--optimizer_args for {name}: {e}") from None


# the names --lr_scheduler takes (sd-scripts hands them to transformers' / diffusers' get_scheduler functions)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")


def _steps(value: float, total: int) -> int:
    """sd-scripts' int_or_float step counts: a float is a fraction of the training steps."""
    return int(value * total) if isinstance(value, float) else int(value)


class _ConstantForScheduleFree(torch.optim.lr_scheduler.LambdaLR):
    """Schedule-free optimizers need no schedule (they warm up through their own warmup_steps argument): a constant
    factor of 1 that reports the learning rate and saves like any scheduler."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        super().__init__(optimizer, lambda _: 1.0)


def _scheduler_kwargs(cfg: OptimizerConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parse_key_values(cfg.lr_scheduler_args, "--lr_scheduler_args").items():
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise UserError(f"--lr_scheduler_args {key}={value}: the value must be a Python literal (a number, "
                            "a quoted string, a list or a dict)") from None
    return out


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int):
    """The schedule by sd-scripts' rules; `total_steps` counts optimizer steps (the scheduler steps once per
    optimizer step here whatever the process count, so it is sd-scripts' max_train_steps x processes / processes)."""
    from transformers.optimization import (
        TYPE_TO_SCHEDULER_FUNCTION,
        AdafactorSchedule,
        SchedulerType,
    )

    if is_schedule_free(cfg):
        return _ConstantForScheduleFree(optimizer)
    warmup = _steps(cfg.lr_warmup_steps, total_steps) if 0 < cfg.lr_warmup_steps < 1 else int(cfg.lr_warmup_steps)
    decay = _steps(cfg.lr_decay_steps, total_steps) if 0 < cfg.lr_decay_steps < 1 else int(cfg.lr_decay_steps)
    kwargs = _scheduler_kwargs(cfg)
    name = cfg.lr_scheduler

    def no_warmup(what: str):
        if warmup:
            raise UserError(f"{what} takes no warm-up: drop --lr_warmup_steps (or use constant_with_warmup)")

    if cfg.lr_scheduler_type:
        no_warmup(f"--lr_scheduler_type {cfg.lr_scheduler_type}")
        cls = _import_class(cfg.lr_scheduler_type, torch.optim.lr_scheduler, "--lr_scheduler_type")
        try:
            return cls(optimizer, **kwargs)
        except TypeError as e:
            raise UserError(f"--lr_scheduler_args for {cfg.lr_scheduler_type}: {e}") from None
    if uses_adafactor_relative_step(cfg) or name.startswith("adafactor"):
        from transformers.optimization import Adafactor

        if not isinstance(getattr(optimizer, "optimizer", optimizer), Adafactor):
            raise UserError("--lr_scheduler adafactor needs --optimizer_type Adafactor")
        no_warmup("the adafactor schedule (Adafactor with relative_step)")
        initial = float(name.split(":", 1)[1]) if name.startswith("adafactor:") else cfg.learning_rate
        return AdafactorSchedule(optimizer, initial)
    if name not in SCHEDULERS:
        raise UserError(f"unknown --lr_scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        if "step_rules" not in kwargs:
            raise UserError("--lr_scheduler piecewise_constant needs --lr_scheduler_args "
                            "step_rules=\"1:10,0.1:20,0.01\" (factor:until_step pairs, then the last factor)")
        return get_piecewise_constant_schedule(optimizer, **kwargs)
    if name == "constant" and warmup:
        name = "constant_with_warmup"  # sd-scripts refuses the pair; here the warm-up is honoured
    func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    if name == "constant":
        return func(optimizer, **kwargs)
    if name == "constant_with_warmup":
        return func(optimizer, num_warmup_steps=warmup, **kwargs)
    if name == "inverse_sqrt":
        return func(optimizer, num_warmup_steps=warmup, timescale=cfg.lr_scheduler_timescale, **kwargs)
    common = {"num_warmup_steps": warmup, "num_training_steps": total_steps}
    if name == "cosine_with_restarts":
        return func(optimizer, **common, num_cycles=cfg.lr_scheduler_num_cycles, **kwargs)
    if name == "polynomial":
        return func(optimizer, **common, power=cfg.lr_scheduler_power, **kwargs)
    if name == "cosine_with_min_lr":
        if cfg.lr_scheduler_min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        kwargs.setdefault("min_lr_rate", cfg.lr_scheduler_min_lr_ratio)
        return func(optimizer, **common, num_cycles=cfg.lr_scheduler_num_cycles / 2, **kwargs)
    if name == "warmup_stable_decay":
        stable = total_steps - warmup - decay
        if stable < 0:
            raise UserError(f"--lr_warmup_steps ({warmup}) + --lr_decay_steps ({decay}) exceed the {total_steps} "
                            "training steps")
        return func(optimizer, num_warmup_steps=warmup, num_stable_steps=stable, num_decay_steps=decay,
                    num_cycles=cfg.lr_scheduler_num_cycles / 2,
                    min_lr_ratio=cfg.lr_scheduler_min_lr_ratio or 0.0, **kwargs)
    return func(optimizer, **common, **kwargs)  # linear, cosine


__all__ = ["OPTIMIZERS", "SCHEDULERS", "build_optimizer", "build_scheduler", "is_schedule_free", "optimizer_name",
           "set_schedule_free_mode", "uses_adafactor_relative_step"]
