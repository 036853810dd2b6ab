"""Flags of logging: TensorBoard / wandb and the per-step loss file."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import flag


@dataclass
class LogConfig:
    """logging"""

    logging_dir: str | None = flag(None, "TensorBoard log folder (enables logging)")
    log_with: str | None = flag(None, "tracker: tensorboard, wandb or all", choices=["tensorboard", "wandb", "all"],
                                type=str)
    log_prefix: str | None = flag(None, "prefix of the run folder name under --logging_dir")
    loss_log_file: str | None = flag(None, "write per-step losses as JSON lines (used by regression tests)")
    log_config: bool = flag(False, "log the run's settings to the tracker (without secrets and local paths)")
    log_tracker_name: str | None = flag(None, "the tracker's project name (default: --log_prefix, else network_train)")
    log_tracker_config: str | None = flag(None, "a TOML file of the trackers' init arguments, one table per tracker "
                                                "(e.g. [wandb] with entity, tags); replaces --wandb_run_name")
    wandb_run_name: str | None = flag(None, "the wandb run's name")
    wandb_api_key: str | None = flag(None, "log in to wandb with this key before the run (else wandb's own login)")


@dataclass
class ConsoleLogConfig:
    """console log"""

    console_log_level: str | None = flag(None, "log level of the console (and of --console_log_file); default: "
                                               "warnings and errors only", type=str,
                                         choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    console_log_file: str | None = flag(None, "also write the log to this file")
    console_log_simple: bool = flag(False, "plain log lines (they are always plain here: no rich formatting)")


def setup_console_logging(level: str | None, file: str | None) -> None:
    """sd-scripts' console-log flags: the root logger's level, and a file that receives the same lines."""
    import logging

    if level is None and file is None:
        return  # Python's default: warnings and errors on stderr
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if file:
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    logging.basicConfig(level=getattr(logging, level or "WARNING"), format="%(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
