"""Train a LoRA for FLUX.1 (dev / schnell), optionally Kontext-style on image pairs.

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --ae ae.safetensors --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors \
        --dataset_config dataset.toml --network_dim 16 --output_dir out
    accelerate launch flux_train_network.py --config_file run.toml

See docs/flux.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from library.cli import run_main
from library.config.args import add_network_args
from library.config.compat_flags import FluxVariantFlags
from library.config.flags import add_flag_group
from library.config.flux_config import add_flux_args, flux_model_config
from library.train.entry import train_from_argv

DEFAULT_NETWORK_MODULE = "networks.lora_flux"


def add_args(parser: argparse.ArgumentParser) -> None:
    add_network_args(parser)
    add_flux_args(parser)
    add_flag_group(parser, FluxVariantFlags)


def main(argv: Sequence[str] | None = None) -> int:
    return train_from_argv(argv, family="flux", network_kind="lora", description=__doc__, add_args=add_args,
                           unset_values={"network_module": DEFAULT_NETWORK_MODULE}, model_config=flux_model_config)


if __name__ == "__main__":
    sys.exit(run_main(main))
