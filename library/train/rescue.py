"""No work lost: what the loop does when training stops early (an error, Ctrl-C, or SIGTERM from Slurm/Kubernetes).

Once at least one optimizer step is done, the loop saves the network as `<output_name>-interrupted.safetensors` and
the training state as `<output_name>-interrupted-state` (resumable with --resume) *before* it reports why it
stopped. When the output folder itself is the problem (read-only, full disk), the files go to a rescue folder,
`difftune-rescue-<output_name>-<time>` in the current directory, or under the system temp folder if that fails too;
the message says where.

SIGTERM is turned into a flag that the loop checks between optimizer steps, so a step is never cut in half; the run
then saves and exits with 143 (128 + SIGTERM), the code schedulers expect from a terminated job.

Multi-process runs: saving the state is collective (every process writes its RNG state, with barriers). A SIGTERM
is agreed on by all processes at the same step, so they all save together: the flags are summed over the processes
at each step boundary and the sum is read at the next one (reading it at once would make the host wait for the GPU
at every step), so a run stops one or two steps after the signal, every process at the same step. An error on one
process is not agreed on: the others may be blocked in a collective or have failed elsewhere, so a barrier could
hang. Then only the main process saves, the weights alone, without barriers (the network is replicated, so its
copy is the one every process holds), and the state is not saved.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from library.device_copy import to_device
from library.errors import UserError

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143


class TrainingTerminated(UserError):
    """The run was asked to stop (SIGTERM); raised at a step boundary, after which the loop saves and exits 143."""

    exit_code = SIGTERM_EXIT_CODE


class StopSignal:
    """SIGTERM as a flag checked between steps, installed only while the training loop runs."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False
        self._in_flight: _ReducedFlag | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (train() called from a worker thread): keep the default
            self._installed = False

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def agreed(self, accelerator: Any) -> bool:
        """True when any process got SIGTERM. Every process calls this at the same step boundaries, so all of them
        stop at the same step and can save collectively. With several processes, the answer is the sum started at
        the previous boundary (see the module docstring)."""
        if accelerator.num_processes == 1:
            return self.received
        flag = to_device(torch.tensor([1.0 if self.received else 0.0]), accelerator.device)
        previous, self._in_flight = self._in_flight, _ReducedFlag(accelerator.reduce(flag, reduction="sum"))
        return previous is not None and previous.value() > 0


class _ReducedFlag:
    """An all-reduced flag on its way to the host. On a GPU the copy is queued right behind the all-reduce, with an
    event: reading it waits for that event only, not for the step queued after it."""

    def __init__(self, reduced: torch.Tensor):
        self._event: Any = None
        if reduced.device.type == "cuda":
            self._host = torch.empty(reduced.shape, dtype=reduced.dtype, pin_memory=True)
            self._host.copy_(reduced, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = reduced

    def value(self) -> float:
        if self._event is not None:
            self._event.synchronize()
        return float(self._host.sum())


def rescue_folders(output_dir: str, output_name: str) -> list[str]:
    """Where to save, in order: the output folder, then a rescue folder in the current directory, then one in the
    system temp folder."""
    name = f"difftune-rescue-{output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return [output_dir, os.path.abspath(name), os.path.join(tempfile.gettempdir(), name)]


@dataclass
class RescueReport:
    weights: str | None = None
    state: str | None = None
    failures: list[str] = field(default_factory=list)

    def lines(self, step: int) -> list[str]:
        out = []
        if self.weights:
            out.append(f"saved the network as of step {step} to {self.weights}")
        if self.state:
            out.append(f"saved the training state to {self.state} (continue with --resume {self.state})")
        out += [f"could not save to {f}" for f in self.failures]
        if not self.weights and not self.state:
            out.append("nothing could be saved")
        return out


def save_everything(folders: list[str], output_name: str, collective: bool, is_main: bool,
                    save_weights: Callable[[str, str, bool], str], save_state: Callable[[str], None]) -> RescueReport:
    """Save the weights (and, when `collective`, the state) to the first folder that takes them.

    `save_weights(folder, file_name, barrier)` writes on the main process; `save_state(path)` is collective.
    A failing folder is reported and the next one tried, except for a collective state save with several processes,
    which is tried once (a retry after a one-sided failure would pair the wrong barriers)."""
    report = RescueReport()
    weights_name = f"{output_name}-interrupted.safetensors"
    used = folders[0]
    if collective or is_main:
        for folder in folders:
            try:
                report.weights = save_weights(folder, weights_name, collective)
                used = folder
                break
            except Exception as e:  # OSError, or a writer's own error for a full disk
                report.failures.append(f"{folder} ({type(e).__name__}: {e})")
    if not collective:
        return report
    state_folders = [used] + [f for f in folders if f != used]
    state_dir = f"{output_name}-interrupted-state"
    for folder in state_folders:
        path = os.path.abspath(os.path.join(folder, state_dir))
        try:
            save_state(path)
            report.state = path
            break
        except Exception as e:
            report.failures.append(f"{folder} ({type(e).__name__}: {e})")
            if _several_processes():
                break
    return report


def _several_processes() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def tell(lines: list[str]) -> None:
    """Rescue messages go to stderr, just before the error they come with."""
    for line in lines:
        print(line, file=sys.stderr, flush=True)
