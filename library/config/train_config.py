"""The typed run configuration: one dataclass per concern (each declares its flags, see library.config.flags),
grouped in RunConfig. The argparse namespace stops here; the loop sees these dataclasses."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from library.config.cache_flags import CacheConfig
from library.config.dataset_flags import DatasetFlags
from library.config.dataset_source import dataset_source_from_flags
from library.config.distributed_flags import DistributedConfig
from library.config.environment_flags import EnvironmentConfig
from library.config.flags import config_from_namespace
from library.config.hub_flags import HubConfig
from library.config.log_flags import LogConfig
from library.config.model_flags import ModelConfig
from library.config.network_flags import NetworkConfig
from library.config.optimizer_flags import OptimizerConfig
from library.config.sample_flags import SampleConfig
from library.config.save_flags import SaveConfig
from library.config.training_flags import TrainingConfig
from library.config.validation_flags import ValidationConfig
from library.errors import UserError

__all__ = ["CacheConfig", "DatasetFlags", "DistributedConfig", "EnvironmentConfig", "HubConfig", "LogConfig",
           "ModelConfig", "NetworkConfig", "OptimizerConfig", "RunConfig", "SampleConfig", "SaveConfig",
           "TrainingConfig", "ValidationConfig", "from_namespace", "parse_key_values", "run_config_from_namespace"]

from_namespace = config_from_namespace  # the older name, kept for callers


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
    dataset: DatasetFlags = field(default_factory=DatasetFlags)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # DDP / DeepSpeed flags
    hub: HubConfig = field(default_factory=HubConfig)  # uploads and --resume downloads (library/train/hub_upload.py)
    family: str = "sdxl"
    network_kind: str = "lora"  # "lora" (a network_module) or "lllite"
    raw_args: dict[str, Any] = field(default_factory=dict)  # for ss_* metadata and --output_config


def run_config_from_namespace(ns: argparse.Namespace, family: str, network_kind: str = "lora") -> RunConfig:
    if not ns.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required (a single .safetensors file or a diffusers folder)")
    if not getattr(ns, "dataset_config", None) and not getattr(ns, "train_data_dir", None):
        raise UserError("--dataset_config (a dataset TOML) or --train_data_dir (a folder of '<repeats>_<class tokens>' "
                        "sub-folders) is required")
    if ns.full_bf16 and ns.mixed_precision != "bf16":
        raise UserError("--full_bf16 requires --mixed_precision bf16")
    if ns.full_fp16 and ns.mixed_precision != "fp16":
        raise UserError("--full_fp16 requires --mixed_precision fp16")
    fp8 = [f"--{n}" for n in ("fp8_base", "fp8_base_unet") if getattr(ns, n, False)]
    if fp8 and ns.mixed_precision == "no":  # sd-scripts' rule: fp8 weights compute in the mixed-precision dtype
        raise UserError(f"{' / '.join(fp8)} requires --mixed_precision fp16 or bf16 (the fp8 weights are computed "
                        "in that dtype)")
    return RunConfig(
        model=config_from_namespace(ModelConfig, ns),
        training=config_from_namespace(TrainingConfig, ns, dataset_config=dataset_source_from_flags(vars(ns))),
        optimizer=config_from_namespace(OptimizerConfig, ns),
        network=config_from_namespace(NetworkConfig, ns),
        cache=config_from_namespace(CacheConfig, ns),
        save=config_from_namespace(SaveConfig, ns),
        sample=config_from_namespace(SampleConfig, ns),
        log=config_from_namespace(LogConfig, ns),
        validation=config_from_namespace(ValidationConfig, ns),
        dataset=config_from_namespace(DatasetFlags, ns),
        environment=config_from_namespace(EnvironmentConfig, ns),
        distributed=config_from_namespace(DistributedConfig, ns),
        hub=config_from_namespace(HubConfig, ns),
        family=family,
        network_kind=network_kind,
        raw_args=dict(vars(ns)),
    )
