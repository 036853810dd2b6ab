"""Typed training configuration. The argparse namespace stops at the script; the loop sees these dataclasses."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from library.errors import UserError

T = TypeVar("T")


def from_namespace(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Pick the dataclass's fields out of a namespace (missing ones keep their defaults)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    values.update(overrides)
    return cls(**values)


def parse_key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    """`key=value` lists as given to --network_args / --optimizer_args."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{flag}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str
    tokenizer_cache_dir: str | None = None
    allow_pickle: bool = False
    vae: str | None = None
    no_half_vae: bool = False
    v_parameterization: bool = False


@dataclass
class OptimizerConfig:
    optimizer_type: str = "AdamW"
    optimizer_args: list[str] = field(default_factory=list)
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0


@dataclass
class NetworkConfig:
    network_module: str = "networks.lora"
    network_dim: int | None = None
    network_alpha: float = 1.0
    network_dropout: float | None = None
    network_args: list[str] = field(default_factory=list)
    network_weights: str | None = None
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    training_comment: str | None = None
    # ControlNet-LLLite only
    cond_emb_dim: int | None = None


@dataclass
class CacheConfig:
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int = 1
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    text_encoder_cache_dir: str | None = None


@dataclass
class SaveConfig:
    output_dir: str = "output"
    output_name: str = "last"
    save_precision: str | None = None
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None
    no_metadata: bool = False


@dataclass
class SampleConfig:
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    sample_sampler: str = "euler_a"


@dataclass
class LogConfig:
    logging_dir: str | None = None
    log_with: str | None = None
    log_prefix: str | None = None
    loss_log_file: str | None = None


@dataclass
class ValidationConfig:
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    eval_every_n_steps: int | None = None
    eval_dino_model: str | None = None
    eval_clip_model: str | None = None
    eval_rare_token: str | None = None

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_every_n_steps or self.eval_dino_model or self.eval_clip_model)


@dataclass
class TrainingConfig:
    dataset_config: str
    seed: int = 42
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    full_bf16: bool = False
    full_fp16: bool = False
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    min_timestep: int = 0
    max_timestep: int = 1000
    xformers: bool = False
    sdpa_cudnn: bool = False


@dataclass
class RunConfig:
    """Everything one training run needs, grouped by concern."""

    model: ModelConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    network: NetworkConfig
    cache: CacheConfig
    save: SaveConfig
    sample: SampleConfig
    log: LogConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    family: str = "sdxl"
    network_kind: str = "lora"  # "lora" (a network_module) or "lllite"
    raw_args: dict[str, Any] = field(default_factory=dict)  # for ss_* metadata and --output_config


def run_config_from_namespace(ns: argparse.Namespace, family: str, network_kind: str = "lora") -> RunConfig:
    if not ns.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (a single .safetensors file or a diffusers folder)")
    if not ns.dataset_config:
        raise UserError("--dataset_config is required (a TOML dataset config)")
    if ns.full_bf16 and ns.mixed_precision != "bf16":
        raise UserError("--full_bf16 requires --mixed_precision bf16")
    if ns.full_fp16 and ns.mixed_precision != "fp16":
        raise UserError("--full_fp16 requires --mixed_precision fp16")
    return RunConfig(
        model=from_namespace(ModelConfig, ns),
        training=from_namespace(TrainingConfig, ns),
        optimizer=from_namespace(OptimizerConfig, ns),
        network=from_namespace(NetworkConfig, ns),
        cache=from_namespace(CacheConfig, ns),
        save=from_namespace(SaveConfig, ns),
        sample=from_namespace(SampleConfig, ns),
        log=from_namespace(LogConfig, ns),
        validation=from_namespace(ValidationConfig, ns),
        family=family,
        network_kind=network_kind,
        raw_args=dict(vars(ns)),
    )
