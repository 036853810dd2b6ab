"""Train a ControlNet-LLLite for SDXL (base U-Net frozen; dataset with conditioning_data_dir).

    accelerate launch sdxl_train_control_net_lllite.py --config_file run.toml
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from library.cli import run_main
from library.config.args import add_network_args
from library.train.entry import train_from_argv


def add_lllite_args(p: argparse.ArgumentParser) -> None:
    add_network_args(p)
    p.add_argument("--cond_emb_dim", type=int, default=32, help="width of the conditioning-image embedding")
    p.set_defaults(network_dim=64, network_module="networks.control_net_lllite", network_train_unet_only=True)


def main(argv: Sequence[str] | None = None) -> int:
    return train_from_argv(argv, family="sdxl", network_kind="lllite", description=__doc__, add_args=add_lllite_args)


if __name__ == "__main__":
    sys.exit(run_main(main))
