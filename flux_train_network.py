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
from library.config.args import add_network_args, build_train_parser
from library.config.flux_config import add_flux_args, flux_model_config
from library.config.run_config import parse_args_with_config, write_run_config
from library.config.train_config import RunConfig, run_config_from_namespace
from library.errors import UserError

DEFAULT_NETWORK_MODULE = "networks.lora_flux"


def add_args(parser: argparse.ArgumentParser) -> None:
    add_network_args(parser)
    add_flux_args(parser)
    parser.set_defaults(network_module=DEFAULT_NETWORK_MODULE)


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """The shared run config, with FLUX's flags carried in `cfg.model` (a FluxModelConfig)."""
    cfg = run_config_from_namespace(args, "flux", "lora")
    cfg.model = flux_model_config(args)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_train_parser(__doc__)
    add_args(parser)
    args = parse_args_with_config(parser, argv)
    if args.output_config:
        if not args.config_file:
            raise UserError("--output_config writes to --config_file: give --config_file PATH")
        write_run_config(args, args.config_file)
        print(f"wrote {args.config_file}")
        return 0
    from library.train.loop import train

    result = train(build_run_config(args))
    print(f"saved {result.output_file} after {result.global_step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
