"""Train a LoRA / LoCon network for SDXL.

    accelerate launch sdxl_train_network.py --config_file run.toml
    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors \
        --train_data_dir train --resolution 1024 --network_dim 16 --output_dir out
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from library.cli import run_main
from library.config.args import add_network_args
from library.train.entry import train_from_argv

DEFAULT_NETWORK_MODULE = "networks.lora"


def add_args(parser: argparse.ArgumentParser) -> None:
    add_network_args(parser)


def main(argv: Sequence[str] | None = None) -> int:
    return train_from_argv(argv, family="sdxl", network_kind="lora", description=__doc__, add_args=add_args,
                           unset_values={"network_module": DEFAULT_NETWORK_MODULE})


if __name__ == "__main__":
    sys.exit(run_main(main))
