"""The order of batches in an epoch across several datasets: deterministic in (seed, epoch)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PlannedBatch:
    dataset_index: int
    item_indices: tuple[int, ...]


def plan_epoch(datasets: Sequence, epoch: int, seed: int) -> list[PlannedBatch]:
    """Each dataset orders its own batches (one bucket per batch); several datasets are interleaved by a seeded
    shuffle, so resuming at batch k of epoch e replays the same sequence."""
    planned = [PlannedBatch(d, tuple(b)) for d, ds in enumerate(datasets) for b in ds.epoch_batches(epoch)]
    if len(datasets) > 1:
        random.Random(f"{seed}-{epoch}-interleave").shuffle(planned)
    return planned
