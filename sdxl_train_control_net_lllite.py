"""Train a ControlNet-LLLite for SDXL (base U-Net frozen; dataset with conditioning_data_dir).

    accelerate launch sdxl_train_control_net_lllite.py --config_file run.toml
    accelerate launch sdxl_train_control_net_lllite.py --pretrained_model_name_or_path sdxl.safetensors \
        --train_data_dir images --conditioning_data_dir canny --caption_extension .txt --resolution 1024 \
        --output_dir out
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from library.cli import run_main
from library.config.args import add_network_args
from library.train.entry import train_from_argv

UNSET_VALUES = {"network_dim": 64, "cond_emb_dim": 32, "network_module": "networks.control_net_lllite"}


def add_args(parser: argparse.ArgumentParser) -> None:
    add_network_args(parser, lllite=True)
    parser.set_defaults(network_train_unet_only=True)


def main(argv: Sequence[str] | None = None) -> int:
    return train_from_argv(argv, family="sdxl", network_kind="lllite", description=__doc__, add_args=add_args,
                           unset_values=UNSET_VALUES)


if __name__ == "__main__":
    sys.exit(run_main(main))
