"""Training state on disk: atomic state folders for --save_state / --resume, and output file names."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

from library.errors import UserError

STATE_FILE = "loop_state.json"


@dataclass
class LoopState:
    """Where the loop is. Everything else needed to continue exactly is derived from it and the seed."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    num_processes: int = 1
    batches_per_epoch: int = 0
    seed: int = 0


def step_file_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}.safetensors"


def epoch_file_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}.safetensors"


def save_state(accelerator, state: LoopState, path: str) -> None:
    """Write accelerate's state (optimizer, scheduler, RNG, network) plus the loop position, atomically:
    a crash mid-write leaves the previous state folder intact."""
    tmp = path + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(state), f, indent=1)
        old = path + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_loop_state(path: str) -> LoopState:
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise UserError(f"--resume {path}: not a state folder written by --save_state (no {STATE_FILE})")
    try:
        with open(file, encoding="utf-8") as f:
            return LoopState(**json.load(f))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"--resume {path}: {STATE_FILE} is unreadable ({e})") from None


def load_state(accelerator, path: str, batches_per_epoch: int) -> LoopState:
    state = read_loop_state(path)
    if state.num_processes != accelerator.num_processes:
        raise UserError(f"--resume {path}: saved with {state.num_processes} process(es), now running with "
                        f"{accelerator.num_processes}; resume with the same number of processes")
    if state.batches_per_epoch and state.batches_per_epoch != batches_per_epoch:
        raise UserError(f"--resume {path}: the dataset changed ({state.batches_per_epoch} batches per epoch "
                        f"then, {batches_per_epoch} now); resume with the same dataset config")
    accelerator.load_state(path)
    return state
