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
