"""Training state on disk: atomic, pickle-free state folders for --save_state / --resume, and output file names.

A state folder holds (see docs/training.md, "Resume"):

- `network.safetensors`: the network's state dict;
- `optimizer.json` + `optimizer.safetensors`, `scheduler.json` (+ `.safetensors`), `scaler.json` with fp16 loss
  scaling: the state dicts, structure as JSON and tensors as safetensors (library/train/state_io.py);
- `rng-<rank>.json` + `.safetensors`: each process's random number generators;
- `loop_state.json`: where the loop is; `state.json`: the format version and what the state depends on (network
  shapes, optimizer, dataset fingerprint, process count; library/train/state_identity.py).

Nothing in it is pickled, so --resume never runs code from the folder. Folders written by earlier versions through
accelerate's save_state (pickles) load only with --allow_pickle.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

from safetensors.torch import save_file

from library.errors import UserError
from library.train import state_io
from library.train.state_identity import describe_run, differences, ignored_changes

STATE_FILE = "loop_state.json"
FORMAT_FILE = "state.json"
FORMAT = "difftune-training-state"
VERSION = 1
NETWORK_FILE = "network.safetensors"
# what accelerate's save_state wrote (torch.save pickles); any of them marks a folder of the old format
_PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")


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


def _scaler(accelerator: Any) -> Any:
    """accelerate's GradScaler under fp16 mixed precision, else None."""
    return getattr(accelerator, "scaler", None)


def save_state(session: Any, state: LoopState, path: str) -> None:
    """Write the state folder atomically: everything goes into PATH.tmp, which then replaces PATH, so a crash
    mid-write leaves the previous state folder intact. The network is replicated (also under FSDP, where only the
    frozen base model is sharded), so the main process writes it and the optimizer state; each process writes its
    own random number generator state.

    With several processes, a failure on one (a full disk, an unwritable folder) must not leave the others waiting at
    a barrier the failed one never reaches: every process passes every synchronisation point, the processes agree
    whether all parts were written before the folder is swapped in, and each then raises its own error."""
    acc = session.accelerator
    main = acc.is_main_process
    tmp = path + ".tmp"
    error: Exception | None = None

    def attempt(write) -> None:
        nonlocal error
        if error is None:
            try:
                write()
            except Exception as e:  # OSError, a full disk, a safetensors or JSON writer's own error
                error = e

    if main:
        attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), os.makedirs(tmp)))
    ready = _everyone_ok(acc, error is None)
    if ready:
        attempt(lambda: state_io.write_tree(tmp, f"rng-{acc.process_index}", state_io.rng_state()))
        if main:
            attempt(lambda: _write_main_parts(session, state, tmp))
    written = _everyone_ok(acc, ready and error is None)
    if main:
        if written:
            attempt(lambda: _swap_in(tmp, path))
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    if error is not None:
        raise error
    if not written:
        raise UserError(f"the training state was not saved to {path}: another process could not write its part "
                        "(its error is reported there)")


def _write_main_parts(session: Any, state: LoopState, folder: str) -> None:
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in session.network.module.state_dict().items()}
    save_file(weights, os.path.join(folder, NETWORK_FILE))
    state_io.write_tree(folder, "optimizer", session.optimizer.state_dict())
    state_io.write_tree(folder, "scheduler", session.scheduler.state_dict())
    scaler = _scaler(session.accelerator)
    if scaler is not None and scaler.state_dict():
        state_io.write_tree(folder, "scaler", scaler.state_dict())
    state_io.write_json(os.path.join(folder, STATE_FILE), asdict(state))
    state_io.write_json(os.path.join(folder, FORMAT_FILE),
                        {"format": FORMAT, "version": VERSION, "depends": describe_run(session)})


def _swap_in(tmp: str, path: str) -> None:
    old = path + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _everyone_ok(accelerator: Any, ok: bool) -> bool:
    """True when `ok` holds on every process; a synchronisation point like a barrier."""
    if accelerator.num_processes == 1:
        return ok
    import torch

    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum").item()) == 0.0


def read_loop_state(path: str) -> LoopState:
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        raise UserError(f"--resume {path}: not a state folder written by --save_state (no {STATE_FILE})")
    try:
        with open(file, encoding="utf-8") as f:
            return LoopState(**json.load(f))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"--resume {path}: {STATE_FILE} is unreadable ({e})") from None


def _pickle_files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(_PICKLE_SUFFIXES))


def load_state(session: Any, path: str) -> LoopState:
    """Restore a state folder into the session (network, optimizer, scheduler, loss scaler, RNG) and return the loop
    position. Refuses, naming what changed, a state saved by a run that differs from this one."""
    state = read_loop_state(path)
    if not os.path.isfile(os.path.join(path, FORMAT_FILE)):
        return _load_pickled_state(session, path, state)
    try:
        meta = state_io.read_json(os.path.join(path, FORMAT_FILE))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("depends"), dict):
            raise state_io.StateFormatError(f"{FORMAT_FILE} is not a {FORMAT} description")
        if meta.get("version") != VERSION:
            raise state_io.StateFormatError(f"format version {meta.get('version')}; this version reads {VERSION}")
        _check_fits(session, path, meta["depends"])
        _restore(session, path)
    except state_io.StateFormatError as e:
        raise UserError(f"--resume {path}: the state folder is damaged or incomplete: {e}") from None
    return state


def _check_fits(session: Any, path: str, then: dict[str, Any]) -> None:
    now = describe_run(session)
    try:
        diffs = differences(then, now)
    except (AttributeError, TypeError, KeyError) as e:
        raise state_io.StateFormatError(f"{FORMAT_FILE} does not describe a run ({e})") from None
    if diffs:
        raise UserError(f"--resume {path}: the state was saved by a run that differs from this one, so it cannot "
                        "continue it:\n  - " + "\n  - ".join(diffs) +
                        "\nResume with the settings the state was saved with, or train from the start without --resume")
    for change in ignored_changes(then, now):
        session.accelerator.print(f"note: {change}: not applied, the optimizer's settings and learning rates "
                                  f"continue from {path}")


def _restore(session: Any, path: str) -> None:
    acc = session.accelerator
    weights = state_io.read_tensors(os.path.join(path, NETWORK_FILE))
    parts = [("network", lambda: session.network.module.load_state_dict(weights, strict=True)),
             ("optimizer", lambda: session.optimizer.load_state_dict(state_io.read_tree(path, "optimizer"))),
             ("scheduler", lambda: session.scheduler.load_state_dict(state_io.read_tree(path, "scheduler")))]
    scaler = _scaler(acc)
    if scaler is not None and os.path.isfile(os.path.join(path, "scaler.json")):
        parts.append(("scaler", lambda: scaler.load_state_dict(state_io.read_tree(path, "scaler"))))
    parts.append(("rng", lambda: state_io.set_rng_state(state_io.read_tree(path, f"rng-{acc.process_index}"))))
    for name, load in parts:
        try:
            load()
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise state_io.StateFormatError(f"the {name} state does not load ({type(e).__name__}: {e})") from None


def _load_pickled_state(session: Any, path: str, state: LoopState) -> LoopState:
    """A folder written through accelerate's save_state by earlier versions: its optimizer, scheduler, network and
    RNG files are pickles, and unpickling runs whatever code the file names. Only with --allow_pickle."""
    acc, cfg = session.accelerator, session.cfg
    pickles = _pickle_files(path)
    if not pickles:
        raise UserError(f"--resume {path}: the state folder is incomplete (no {FORMAT_FILE}); use a folder written "
                        "by --save_state")
    if not cfg.model.allow_pickle:
        raise UserError(f"--resume {path}: this state folder is in the old pickle format ({', '.join(pickles[:4])}"
                        f"{', ...' if len(pickles) > 4 else ''}). Loading a pickle runs any code the file contains, so "
                        "it is refused. If you wrote this folder yourself and trust it, add --allow_pickle to resume "
                        "from it once (the states saved from then on are pickle-free); otherwise delete it")
    if state.num_processes != acc.num_processes:
        raise UserError(f"--resume {path}: saved with {state.num_processes} process(es), now running with "
                        f"{acc.num_processes}; resume with the same number of processes")
    if state.batches_per_epoch and state.batches_per_epoch != session.batches_per_epoch:
        raise UserError(f"--resume {path}: the dataset changed ({state.batches_per_epoch} batches per epoch "
                        f"then, {session.batches_per_epoch} now); resume with the same dataset config")
    acc.print(f"--allow_pickle: loading the pickled state folder {path} (old format)")
    # the order the old save_state registered them in: custom_checkpoint_0 is the network, _1 the scheduler
    acc.register_for_checkpointing(session.network.module, session.scheduler)
    try:
        acc.load_state(path)
    except (KeyError, ValueError, RuntimeError, FileNotFoundError) as e:
        raise UserError(f"--resume {path}: the pickled state does not fit this run ({type(e).__name__}: {e}); "
                        "resume with the settings it was saved with") from None
    return state
