"""The trainer scripts' shared wiring: parse (with --config_file), build the run config, train."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping, Sequence

from library.config.args import build_train_parser
from library.config.compat_flags import ModelGenerationFlags, check_model_generation, compat_warnings
from library.config.distributed_flags import DistributedConfig, distributed_warnings
from library.config.environment_flags import environment_warnings, warn_once
from library.config.hub_flags import HubConfig, hub_warnings
from library.config.log_flags import setup_console_logging
from library.config.run_config import parse_args_with_config, write_run_config
from library.config.train_config import ModelConfig, run_config_from_namespace
from library.errors import UserError
from library.train.hub_upload import resolve_hub_resume


# Groups every trainer has beyond the shared ones (sd-scripts' trainers all take them).
TRAINER_GROUPS: tuple[type, ...] = (DistributedConfig, HubConfig, ModelGenerationFlags)


def build_script_parser(description: str | None, add_args: Callable[[argparse.ArgumentParser], None]
                        ) -> argparse.ArgumentParser:
    """A trainer's full parser: the shared groups plus the script's own (also what the flag-set test inspects)."""
    parser = build_train_parser(description, TRAINER_GROUPS)
    add_args(parser)
    return parser


def train_from_argv(argv: Sequence[str] | None, *, family: str, network_kind: str, description: str | None,
                    add_args: Callable[[argparse.ArgumentParser], None],
                    unset_values: Mapping[str, Any] | None = None,
                    model_config: Callable[[argparse.Namespace], ModelConfig] | None = None) -> int:
    """`unset_values`: the script's values for flags left unset (e.g. FLUX's network module); `model_config` lets a
    family carry its own flags in a ModelConfig subclass (e.g. FLUX's FluxModelConfig)."""
    parser = build_script_parser(description, add_args)
    args = parse_args_with_config(parser, argv)
    if args.output_config:
        if not args.config_file:
            raise UserError("--output_config writes to --config_file: give --config_file PATH")
        write_run_config(args, args.config_file)
        print(f"wrote {args.config_file}")
        return 0
    setup_console_logging(args.console_log_level, args.console_log_file)
    for name, value in (unset_values or {}).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    apply_environment(args)
    apply_machine_flags(args, family)
    from library.train.loop import train

    cfg = run_config_from_namespace(args, family, network_kind)
    if model_config is not None:
        cfg.model = model_config(args)
    result = train(cfg)
    print(f"saved {result.output_file} after {result.global_step} steps")
    return 0


def apply_environment(args: argparse.Namespace) -> None:
    """Warn once about machine flags that cannot apply here, and turn off what would fail (never stop the run)."""
    import torch

    from library.config.environment_flags import _xformers_available

    warn_once(environment_warnings(vars(args), torch.cuda.is_available()))
    if getattr(args, "xformers", False) and not _xformers_available():
        args.xformers = False
    if getattr(args, "save_model_as", None) in ("ckpt", "pt"):
        args.save_model_as = "safetensors"


def apply_machine_flags(args: argparse.Namespace, family: str) -> None:
    """Stop on flags that name what cannot train here (--v2 for SDXL, --model_type chroma), warn once about
    multi-process / Hub flags done another way, download a --resume_from_huggingface state, and set how model files
    are read."""
    from library.models.single_file import set_safetensors_mmap

    values = vars(args)
    check_model_generation(values, family)
    if getattr(args, "cpu_offload_checkpointing", False) and getattr(args, "blocks_to_swap", None):
        raise UserError("--cpu_offload_checkpointing cannot be combined with --blocks_to_swap (as in sd-scripts): "
                        "swapping already moves the blocks between CPU and GPU; drop one of them")
    warn_once(distributed_warnings(values) + hub_warnings(values) + compat_warnings(values, family))
    resolve_hub_resume(args)  # --resume_from_huggingface: --resume becomes the downloaded state folder
    set_safetensors_mmap(not getattr(args, "disable_mmap_load_safetensors", False))
