"""What the demo shows a newcomer: the loss curve and what the LoRA changes, as pictures and two numbers.

The demo's tiny model is randomly initialised, so its generated images are noise whatever the prompt; the evidence
that training worked is elsewhere: the loss falls, and the same seeds give different pixels with the LoRA than
without it. This module draws both (PIL and numpy only: matplotlib is not a dependency) and summarises them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from library.errors import UserError

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
RAW = (160, 190, 235)
SMOOTH = (20, 70, 180)


@dataclass
class LossSummary:
    steps: int
    first: float  # mean loss over the first `window` steps
    last: float  # mean loss over the last `window` steps
    window: int


@dataclass
class LoraChange:
    pairs: int
    mean_abs: float  # mean |with - without| over all pixels and channels, in 0..255 units
    max_abs: int


def read_loss_log(path: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from the trainer's `--loss_log_file` (JSON lines)."""
    if not path.is_file():
        raise UserError(f"{path}: no loss log was written; the training step of the demo did not log its losses")
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            points.append((int(record["step"]), float(record["loss"])))
    if not points:
        raise UserError(f"{path}: the loss log is empty; the training step of the demo ran no steps")
    return points


def summarise_losses(points: list[tuple[int, float]]) -> LossSummary:
    """Per-step losses are noisy (a random timestep per sample), so compare means over the first and last steps."""
    window = max(1, min(5, len(points) // 4))
    losses = [loss for _, loss in points]
    return LossSummary(steps=len(points), first=float(np.mean(losses[:window])),
                       last=float(np.mean(losses[-window:])), window=window)


def moving_average(values: list[float], width: int) -> list[float]:
    """Trailing mean over up to `width` values, same length as the input."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def draw_loss_curve(points: list[tuple[int, float]], path: Path, size: tuple[int, int] = (560, 320)) -> Path:
    """Per-step loss (light) and its moving average (dark) against the step, with labelled axes."""
    w, h = size
    left, right, top, bottom = 56, 16, 28, 36
    img = Image.new("RGB", size, BACKGROUND)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = min(steps), max(steps)
    span = max(1, s1 - s0)

    def xy(step: float, loss: float) -> tuple[float, float]:
        return (left + (step - s0) / span * (w - left - right), top + (hi - loss) / (hi - lo) * (h - top - bottom))

    for i in range(5):  # horizontal grid lines with loss labels
        value = lo + (hi - lo) * i / 4
        y = xy(s0, value)[1]
        d.line([(left, y), (w - right, y)], fill=GRID)
        d.text((4, y - 6), f"{value:.3f}", fill=INK, font=font)
    d.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill=INK)
    d.text((left, h - bottom + 4), str(s0), fill=INK, font=font)
    d.text((w - right - 6 * len(str(s1)), h - bottom + 4), str(s1), fill=INK, font=font)
    d.text(((w - 30) // 2, h - bottom + 16), "step", fill=INK, font=font)
    d.text((left, 6), "training loss per step (light) and its moving average (dark)", fill=INK, font=font)
    if len(points) > 1:
        d.line([xy(s, v) for s, v in points], fill=RAW, width=1)
        smooth = moving_average(losses, max(2, len(losses) // 8))
        d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=SMOOTH, width=2)
    else:
        x, y = xy(*points[0])
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=SMOOTH)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _pair_key(png: Path) -> str:
    """Generated names end in `_<index>_<seed>.png`; the part before is a per-run timestamp."""
    return "_".join(png.stem.split("_")[-2:])


def pair_images(without_dir: Path, with_dir: Path) -> list[tuple[Path, Path]]:
    """Images of the two generation runs that share index and seed (hence prompt and starting noise)."""
    without = {_pair_key(p): p for p in sorted(without_dir.glob("*.png"))}
    with_ = {_pair_key(p): p for p in sorted(with_dir.glob("*.png"))}
    keys = sorted(without.keys() & with_.keys())
    if not keys:
        raise UserError(f"{without_dir} and {with_dir}: no images with the same index and seed to compare")
    return [(without[k], with_[k]) for k in keys]


def draw_difference_sheet(pairs: list[tuple[Path, Path]], path: Path) -> LoraChange:
    """One column per pair: without the LoRA, with it, and their |difference| stretched to be visible."""
    without = [np.asarray(Image.open(a).convert("RGB"), dtype=np.int16) for a, _ in pairs]
    with_ = [np.asarray(Image.open(b).convert("RGB"), dtype=np.int16) for _, b in pairs]
    diffs = [np.abs(b - a) for a, b in zip(without, with_)]
    max_abs = int(max(int(x.max()) for x in diffs))
    # Stretch so that the 99th percentile of the differences is white: a few extreme pixels must not leave the rest
    # too dark to see. (Identical images stay black.)
    p99 = float(np.percentile(np.concatenate([x.ravel() for x in diffs]), 99))
    gain = 255.0 / p99 if p99 > 0 else (255.0 / max_abs if max_abs else 1.0)
    label_w, pad = 112, 4
    cell_w = max(a.shape[1] for a in without)
    cell_h = max(a.shape[0] for a in without)
    rows = (("without LoRA", without), ("with LoRA", with_), (f"|difference| x{gain:.1f}", diffs))
    sheet = Image.new("RGB", (label_w + len(pairs) * (cell_w + pad), len(rows) * (cell_h + pad)), BACKGROUND)
    d = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, (label, images) in enumerate(rows):
        y = r * (cell_h + pad)
        d.text((4, y + cell_h // 2 - 6), label, fill=INK, font=font)
        for c, arr in enumerate(images):
            if label.startswith("|"):
                arr = np.clip(arr * gain, 0, 255)
            sheet.paste(Image.fromarray(arr.astype(np.uint8)), (label_w + c * (cell_w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    mean_abs = float(np.mean([x.mean() for x in diffs]))
    return LoraChange(pairs=len(pairs), mean_abs=mean_abs, max_abs=max_abs)
