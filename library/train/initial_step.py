"""--initial_epoch / --initial_step / --skip_until_initial_step: where a run starts counting, as in sd-scripts.

Without --skip_until_initial_step only the epoch number moves (file names, caption-dropout epochs, the data order of
that epoch) and the run still trains its full step count. With it, the steps before the initial step count as done:
their batches are skipped, so a run restarted without a state continues on the data it would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass

from library.errors import UserError


@dataclass(frozen=True)
class StartPosition:
    global_step: int
    epoch: int  # 0-based
    batch_in_epoch: int  # micro-batches already taken from that epoch


def start_position(initial_epoch: int | None, initial_step: int | None, skip: bool, steps_per_epoch: int,
                   accumulation: int, total_steps: int) -> StartPosition | None:
    """The loop position the flags ask for, or None when neither flag is given (a --resume state decides)."""
    if initial_step is None and initial_epoch is None:
        return None
    if initial_step is not None:
        step = initial_step
    else:
        if initial_epoch < 1:
            raise UserError(f"--initial_epoch {initial_epoch}: epochs count from 1")
        step = (initial_epoch - 1) * steps_per_epoch
    if step < 0:
        raise UserError(f"--initial_step {step}: must be 0 or more")
    epoch = step // steps_per_epoch
    if not skip:
        return StartPosition(0, epoch, 0)
    if step >= total_steps:
        raise UserError(f"--initial_step {step} is not below the {total_steps} training steps: raise "
                        "--max_train_steps / --max_train_epochs or lower the initial step")
    return StartPosition(step, epoch, (step % steps_per_epoch) * accumulation)
