"""YOLO-format labels for the kept synthetic images (`--yolo_labels`).

`OUT/labels/<name>.txt` holds one `class_id cx cy w h` line per box, normalised to the output image size (boxes
clipped to the image), next to `OUT/images/<name>.png` as YOLO trainers expect (images/ -> labels/).
`OUT/labels/classes.txt` lists the label names, sorted, one per line: line k is class k. The names come from every
usable input record, not only the generated ones, so that ids stay the same when `--num_samples` changes.
Classification records have no boxes: their images get no label file (YOLO reads that as background, so leave them
out of a detection dataset or label them yourself).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from library.fileio import write_text_atomic
from library.synth.records import Box, SourceRecord

LABELS_DIR = "labels"
CLASSES_FILE = "classes.txt"


def class_ids(sources: Iterable[SourceRecord]) -> dict[str, int]:
    names = sorted({label for s in sources for label in s.labels})
    return {name: k for k, name in enumerate(names)}


def yolo_lines(boxes: Sequence[Box], classes: dict[str, int], size: tuple[int, int]) -> list[str]:
    w, h = size
    lines = []
    for b in boxes:
        x1, x2 = min(max(b.x1, 0.0), w), min(max(b.x2, 0.0), w)
        y1, y2 = min(max(b.y1, 0.0), h), min(max(b.y2, 0.0), h)
        cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
        lines.append(f"{classes[b.label]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return lines


class YoloLabelWriter:
    """Writes classes.txt once and one label file per kept detection sample; removes stale files of others."""

    def __init__(self, root: Path, sources: Iterable[SourceRecord]):
        self.folder = root / LABELS_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.classes = class_ids(sources)
        write_text_atomic(self.folder / CLASSES_FILE, "".join(f"{n}\n" for n in self.classes), newline=None)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.txt"

    def write(self, name: str, task: str, boxes: Sequence[Box], size: tuple[int, int], kept: bool) -> Path | None:
        target = self.path(name)
        if not kept or task != "detection":
            target.unlink(missing_ok=True)
            return None
        lines = yolo_lines(boxes, self.classes, size)
        write_text_atomic(target, "".join(line + "\n" for line in lines), newline=None)
        return target
