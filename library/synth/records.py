"""Reading and writing prediction records (one JSON object per line).

A record is what a classifier or detector wrote about one image:
    {"image_id": "...", "task": "classification", "prediction": {"label": "cat"}, "raw": {"meta": {...}}}
    {"image_id": "...", "task": "detection", "prediction": {"detections": [{"bbox": [x1, y1, x2, y2], "label": "dog"}]},
     "raw": {"meta": {"abs_path": "...", "rel_path": "...", "root": "..."}}}
Bad lines are collected as `RecordProblem`s with their line numbers, so a user sees every fault of a file at once
and can choose to skip them or to stop.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from library.errors import UserError
from library.fileio import write_text_atomic

TASKS = ("classification", "detection")


class RecordsError(UserError):
    """The predictions file cannot be used (unreadable, or bad lines under --on_error fail)."""


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    label: str

    def scaled(self, sx: float, sy: float) -> "Box":
        return Box(self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy, self.label)

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


@dataclass
class SourceRecord:
    """One valid input record, its image resolved to a file that exists."""

    line_no: int
    image_id: str
    task: str
    image_path: str
    labels: list[str]  # classification: [label]; detection: the boxes' labels in order
    boxes: list[Box]  # detection only
    raw_record: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class RecordProblem:
    line_no: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.message}"


def _image_path(meta: dict[str, Any], images_root: str | None, predictions_dir: str) -> str | None:
    """The first existing candidate: abs_path, then rel_path under --images_root, under meta.root, then under the
    predictions file's folder. None when no path field is present at all."""
    candidates: list[str] = []
    if meta.get("abs_path"):
        candidates.append(str(meta["abs_path"]))
    rel = meta.get("rel_path")
    if rel:
        for base in (images_root, meta.get("root"), predictions_dir):
            if base:
                candidates.append(os.path.join(str(base), str(rel)))
    if not candidates:
        return None
    for c in candidates:
        if os.path.isfile(c):
            return c
    return ""  # paths were given but none exists


def _parse_box(det: Any, k: int) -> Box:
    if not isinstance(det, dict):
        raise ValueError(f"prediction.detections[{k}] must be an object with bbox and label")
    bbox, label = det.get("bbox"), det.get("label")
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"prediction.detections[{k}].label must be a non-empty string")
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise ValueError(f"prediction.detections[{k}].bbox must be [x1, y1, x2, y2] numbers")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"prediction.detections[{k}].bbox {list(bbox)} has x2 < x1 or y2 < y1")
    return Box(x1, y1, x2, y2, label.strip())


def parse_record(obj: Any, line_no: int, images_root: str | None, predictions_dir: str) -> SourceRecord:
    """Validate one decoded line; raises ValueError with a message that names the field at fault."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    image_id = obj.get("image_id")
    if not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or str(image_id) == "":
        raise ValueError("missing 'image_id'")
    task = obj.get("task")
    if task not in TASKS:
        raise ValueError(f"'task' must be one of {', '.join(TASKS)}, got {task!r}")
    pred = obj.get("prediction")
    if not isinstance(pred, dict):
        raise ValueError("missing 'prediction' object")
    boxes: list[Box] = []
    if task == "classification":
        label = pred.get("label")
        if not isinstance(label, str) or not label.strip():
            raise ValueError("classification record needs a non-empty 'prediction.label'")
        labels = [label.strip()]
    else:
        dets = pred.get("detections")
        if not isinstance(dets, list):
            raise ValueError("detection record needs a 'prediction.detections' list")
        boxes = [_parse_box(d, k) for k, d in enumerate(dets)]
        labels = [b.label for b in boxes]
    raw = obj.get("raw")
    meta = raw.get("meta") if isinstance(raw, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("missing 'raw.meta' object with abs_path or rel_path")
    path = _image_path(meta, images_root, predictions_dir)
    if path is None:
        raise ValueError("'raw.meta' has neither abs_path nor rel_path")
    if path == "":
        shown = meta.get("abs_path") or meta.get("rel_path")
        hint = "" if images_root else " (give --images_root for relative paths)"
        raise ValueError(f"image '{shown}' not found{hint}")
    return SourceRecord(line_no, str(image_id), task, path, labels, boxes, obj)


def read_predictions(path: str, images_root: str | None = None) -> tuple[list[SourceRecord], list[RecordProblem]]:
    """Every valid record, and every bad line (bad JSON, bad fields, missing image) with its line number."""
    if not os.path.isfile(path):
        raise RecordsError(f"--predictions '{path}': no such file")
    if images_root is not None and not os.path.isdir(images_root):
        raise RecordsError(f"--images_root '{images_root}': no such folder")
    records: list[SourceRecord] = []
    problems: list[RecordProblem] = []
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordsError(f"--predictions '{path}': cannot read it ({exc})") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(RecordProblem(line_no, f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        try:
            records.append(parse_record(obj, line_no, images_root, base))
        except ValueError as exc:
            problems.append(RecordProblem(line_no, str(exc)))
    return records, problems


def check_problems(path: str, records: list[SourceRecord], problems: list[RecordProblem], on_error: str) -> None:
    """Apply --on_error: 'fail' stops on any bad line; 'skip' only stops when nothing usable is left."""
    if problems and on_error == "fail":
        listed = "; ".join(str(p) for p in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise RecordsError(f"{path}: {len(problems)} bad record(s): {listed}{more}")
    if not records:
        raise RecordsError(f"{path}: no usable records" + (f" ({len(problems)} skipped)" if problems else ""))


def generation_meta(source_image_id: str, lora_path: str | None, controlnet_types: list[str], prompt: str,
                    seed: int) -> dict[str, Any]:
    """What `raw.meta` says about a generated image, so that consumers that read only `raw.meta` (dataset loaders,
    viewers) can tell synthetic images from real ones and trace them to their source, prompt and seed."""
    return {"generated": True, "source_image_id": source_image_id, "lora_path": lora_path,
            "controlnet_types": list(controlnet_types), "prompt": prompt, "seed": seed}


def synthetic_record(source: SourceRecord, image_id: str, abs_path: str, rel_path: str, root: str,
                     size: tuple[int, int], source_size: tuple[int, int], synthetic: dict[str, Any],
                     generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The source's record with a new id and paths, its boxes scaled to the output size, and a `synthetic` block;
    `generation` (see `generation_meta`) is merged into `raw.meta`."""
    rec = copy.deepcopy(source.raw_record)
    rec["image_id"] = image_id
    if source.task == "detection":
        sx, sy = size[0] / source_size[0], size[1] / source_size[1]
        dets = rec["prediction"]["detections"]
        for det, box in zip(dets, source.boxes):
            det["bbox"] = [round(v, 2) for v in box.scaled(sx, sy).as_list()]
    raw = rec.setdefault("raw", {})
    meta = raw.setdefault("meta", {})
    meta.update(abs_path=abs_path, rel_path=rel_path, root=root, width=size[0], height=size[1])
    meta.update(generation or {})
    rec["synthetic"] = synthetic
    return rec


def scaled_boxes(source: SourceRecord, size: tuple[int, int], source_size: tuple[int, int]) -> list[Box]:
    sx, sy = size[0] / source_size[0], size[1] / source_size[1]
    return [b.scaled(sx, sy) for b in source.boxes]


def write_jsonl_atomic(path: str, records: Iterable[dict[str, Any]]) -> None:
    """Temp file + replace: a crash mid-write never leaves a truncated file that a rerun would trust."""
    write_text_atomic(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records), newline=None)


def read_jsonl_lenient(path: str) -> list[dict[str, Any]]:
    """Our own earlier output: unreadable lines are dropped (their samples are simply made again)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out
