"""The trainer scripts' shared wiring: parse (with --config_file), build the run config, train."""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

from library.config.args import build_train_parser
from library.config.run_config import parse_args_with_config, write_run_config
from library.config.train_config import ModelConfig, run_config_from_namespace
from library.errors import UserError


def train_from_argv(argv: Sequence[str] | None, *, family: str, network_kind: str, description: str,
                    add_args: Callable[[argparse.ArgumentParser], None],
                    model_config: Callable[[argparse.Namespace], ModelConfig] | None = None) -> int:
    """`model_config` lets a family carry its own flags in a ModelConfig subclass (e.g. FLUX's FluxModelConfig)."""
    parser = build_train_parser(description)
    add_args(parser)
    args = parse_args_with_config(parser, argv)
    if args.output_config:
        if not args.config_file:
            raise UserError("--output_config writes to --config_file: give --config_file PATH")
        write_run_config(args, args.config_file)
        print(f"wrote {args.config_file}")
        return 0
    from library.train.loop import train

    cfg = run_config_from_namespace(args, family, network_kind)
    if model_config is not None:
        cfg.model = model_config(args)
    result = train(cfg)
    print(f"saved {result.output_file} after {result.global_step} steps")
    return 0
