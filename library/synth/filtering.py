"""Keep a synthetic image only when a detector finds what its record claims.

A detector is any callable `detect(image: PIL.Image.Image) -> list[{"bbox": [x1, y1, x2, y2], "label": str,
"score": float}]` (pixel coordinates of that image), named on the command line as `module:function`. If the named
object is a class or a factory that takes no arguments it is called once to get the detector. `YoloDetector` adapts
an ultralytics YOLO model; ultralytics is optional and imported only when --yolo is used.

Matching is one-to-one and greedy by IoU: each carried box takes the best unused detection of the same label, so
two boxes cannot both be "found" by one detection. Labels compare case-insensitively, with '_' as ' '.
A classification record (no boxes) is kept when some detection carries its label.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from PIL import Image

from library.errors import UserError
from library.synth.records import Box

Detection = dict[str, Any]
Detector = Callable[[Image.Image], list[Detection]]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0 for empty boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _norm(label: Any) -> str:
    return " ".join(str(label).replace("_", " ").lower().split())


@dataclass(frozen=True)
class FilterResult:
    kept: bool
    matched: int
    expected: int
    detections: int

    def as_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "matched": self.matched, "expected": self.expected, "detections": self.detections}


def check_detections(dets: Any, where: str) -> list[Detection]:
    if not isinstance(dets, list):
        raise UserError(f"{where}: the detector must return a list of {{bbox, label, score}}, got {type(dets).__name__}")
    for k, d in enumerate(dets):
        if not isinstance(d, dict) or "label" not in d or not isinstance(d.get("bbox"), (list, tuple)) \
                or len(d["bbox"]) != 4:
            raise UserError(f"{where}: detection {k} must be {{'bbox': [x1, y1, x2, y2], 'label': ..., 'score': ...}}, "
                            f"got {d!r}")
    return dets


def match_boxes(boxes: Sequence[Box], labels: Sequence[str], detections: Sequence[Detection], iou_threshold: float,
                min_score: float = 0.0) -> FilterResult:
    """Whether every box is found (IoU >= threshold, same label); without boxes, whether each label is found."""
    dets = [d for d in detections if float(d.get("score", 1.0)) >= min_score]
    if not boxes:
        found = {_norm(d["label"]) for d in dets}
        wanted = [_norm(l) for l in labels]
        matched = sum(1 for l in wanted if l in found)
        return FilterResult(matched == len(wanted), matched, len(wanted), len(dets))
    used: set[int] = set()
    matched = 0
    for box in boxes:
        best, best_iou = None, iou_threshold
        for j, d in enumerate(dets):
            if j in used or _norm(d["label"]) != _norm(box.label):
                continue
            v = iou(box.as_list(), [float(x) for x in d["bbox"]])
            if v >= best_iou:
                best, best_iou = j, v
        if best is not None:
            used.add(best)
            matched += 1
    return FilterResult(matched == len(boxes), matched, len(boxes), len(dets))


def load_detector(spec: str) -> Detector:
    """`package.module:function` -> the callable (a class or zero-argument factory is instantiated once)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--filter '{spec}': expected 'module:function', e.g. 'my_detectors:detect'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"--filter '{spec}': cannot import module '{module_name}' ({exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--filter '{spec}': module '{module_name}' has no '{attr}'")
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        obj = obj()
    if not callable(obj):
        raise UserError(f"--filter '{spec}': '{attr}' is not callable")
    return obj


class YoloDetector:
    """ultralytics YOLO as a detector; the package is imported here only, so it stays an optional dependency."""

    def __init__(self, weights: str, device: str | None = None):
        try:
            from ultralytics import YOLO
        except ImportError:
            raise UserError("--yolo needs the optional package 'ultralytics' (pip install ultralytics; it requires "
                            "torchvision), or give your own detector with --filter module:function") from None
        self.model = YOLO(weights)
        self.device = device

    def __call__(self, image: Image.Image) -> list[Detection]:
        kwargs: dict[str, Any] = {"verbose": False}
        if self.device:
            kwargs["device"] = self.device
        results = self.model(image, **kwargs)
        out: list[Detection] = []
        for result in results:
            names = result.names
            boxes = result.boxes
            for xyxy, cls, conf in zip(_as_list(boxes.xyxy), _as_list(boxes.cls), _as_list(boxes.conf)):
                out.append({"bbox": [float(v) for v in xyxy], "label": str(names[int(cls)]), "score": float(conf)})
        return out


def _as_list(values: Any) -> list:
    """Tensors (ultralytics) and plain lists alike."""
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)
