"""Train a LoRA / LoCon network for SDXL.

    accelerate launch sdxl_train_network.py --config_file run.toml
"""
from __future__ import annotations

import sys
from typing import Sequence

from library.cli import run_main
from library.config.args import add_network_args
from library.train.entry import train_from_argv


def main(argv: Sequence[str] | None = None) -> int:
    return train_from_argv(argv, family="sdxl", network_kind="lora", description=__doc__,
                           add_args=add_network_args)


if __name__ == "__main__":
    sys.exit(run_main(main))
