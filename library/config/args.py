"""The trainers' parsers, assembled from the flag groups (each group is a config dataclass in library/config/).

Scripts name the groups they add beyond the shared ones; the flags themselves are declared once, in the dataclasses
(see library.config.flags).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from library.config.cache_flags import CacheConfig
from library.config.dataset_flags import DatasetFlags
from library.config.environment_flags import EnvironmentConfig
from library.config.flags import add_flag_group, flag_fields
from library.config.log_flags import ConsoleLogConfig, LogConfig
from library.config.model_flags import ModelConfig
from library.config.network_flags import LLLITE_ONLY, NETWORK_MODULE_ONLY, NetworkConfig
from library.config.optimizer_flags import OptimizerConfig
from library.config.run_config import ConfigFileFlags
from library.config.sample_flags import SampleConfig
from library.config.save_flags import SaveConfig
from library.config.training_flags import TrainingConfig
from library.config.validation_flags import ValidationConfig

# The groups every trainer has, in --help order.
SHARED_GROUPS: tuple[type, ...] = (ConfigFileFlags, ModelConfig, DatasetFlags, CacheConfig, TrainingConfig,
                                   OptimizerConfig, SaveConfig, LogConfig, ConsoleLogConfig, SampleConfig,
                                   ValidationConfig, EnvironmentConfig)


def new_parser(description: str | None) -> argparse.ArgumentParser:
    """Every parser of the toolkit: no prefix abbreviations (`--vae` must never mean `--vae_batch_size`)."""
    return argparse.ArgumentParser(description=description, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def build_train_parser(description: str | None, groups: Sequence[type] = ()) -> argparse.ArgumentParser:
    """The shared flags plus the script's own groups."""
    p = new_parser(description)
    for cls in (*SHARED_GROUPS, *groups):
        add_flag_group(p, cls)
    return p


def add_network_args(p: argparse.ArgumentParser, lllite: bool = False) -> None:
    """The network group: LoRA scripts get all but the LLLite-only flags; the LLLite script gets those but not the
    network-module-only ones (--base_weights, --dim_from_weights: sd-scripts' LLLite trainer has neither)."""
    left_out = NETWORK_MODULE_ONLY if lllite else LLLITE_ONLY
    names = [ff.name for ff in flag_fields(NetworkConfig) if ff.name not in left_out]
    add_flag_group(p, NetworkConfig, only=names)
