"""Which earlier checkpoints a save makes obsolete (--save_last_n_epochs[_state], --save_last_n_steps[_state]).

sd-scripts' rule: each save removes exactly one older save, the one that just fell out of the window, so files the
user saved by other means (or renamed) are never swept. Pure arithmetic here; the loop deletes what it names.
"""
from __future__ import annotations

import logging
import math
import os
import shutil

logger = logging.getLogger(__name__)


def epoch_to_remove(epoch: int, every_n_epochs: int | None, keep_last_n: int | None) -> int | None:
    """The epoch whose save leaves the window when `epoch` is saved: keep_last_n saves, one every every_n_epochs."""
    if not keep_last_n or not every_n_epochs:
        return None
    old = epoch - every_n_epochs * keep_last_n
    return old if old > 0 else None


def step_to_remove(step: int, every_n_steps: int | None, keep_last_n_steps: int | None) -> int | None:
    """The step save that falls out when `step` is saved: saves within the last keep_last_n_steps steps stay; the one
    just before that window (a multiple of every_n_steps) goes."""
    if not keep_last_n_steps or not every_n_steps:
        return None
    old = step - keep_last_n_steps - 1
    old -= old % every_n_steps
    return old if old > 0 else None


def state_window(state_n: int | None, model_n: int | None) -> int | None:
    """The _state flags override the model's window for state folders; unset, states follow the model files."""
    return state_n if state_n else model_n


def every_n_epochs_from_ratio(num_epochs: int, ratio: int | None, every_n_epochs: int | None) -> int | None:
    """--save_n_epoch_ratio N: save about N times over the run (at least every epoch); it overrides
    --save_every_n_epochs as in sd-scripts."""
    if ratio is None or ratio <= 0:
        return every_n_epochs
    return math.floor(num_epochs / ratio) or 1


def remove_path(path: str) -> bool:
    """Delete an obsolete network file or state folder; a missing one is fine (never saved, or already removed)."""
    if os.path.isdir(path):
        logger.info("removing old state %s", path)
        shutil.rmtree(path)
        return True
    if os.path.isfile(path):
        logger.info("removing old checkpoint %s", path)
        os.remove(path)
        return True
    return False


__all__ = ["epoch_to_remove", "every_n_epochs_from_ratio", "remove_path", "state_window", "step_to_remove"]
