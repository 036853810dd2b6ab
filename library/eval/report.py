"""From two folders (generated images, real photos of the subject) to a metrics report as plain data.

The report is what `tools/evaluate.py` writes as JSON and what training can log: the means `dino`, `clip_i` and
`clip_t` (None for a metric whose model was not given, so a run without a CLIP model still reports DINO), the
image counts, and one row per generated image so that a user can find the outliers. `compare_reports` turns a LoRA
report and a base-model report (same prompts and seeds, multiplier 0) into the LoRA's gain, the number that says
whether training taught the subject rather than whether the base model already drew something similar.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from library.data.images import IMAGE_EXTENSIONS, load_image
from library.errors import UserError
from library.eval.metrics import (
    CLIP_FLAG,
    DINO_FLAG,
    EmbeddingModel,
    load_clip_model,
    load_dino_model,
    mean_pairwise_cosine,
    paired_cosine,
    per_image_cosine,
    strip_token,
)
from library.fileio import write_text_atomic
from library.prompts.png_metadata import read_png_info

logger = logging.getLogger(__name__)

METRICS = ("dino", "clip_i", "clip_t")
ModelArg = Union[str, os.PathLike, EmbeddingModel, None]
PromptsArg = Union[str, os.PathLike, Sequence[str], None]


class EvalError(UserError):
    """Bad evaluation input (folder, prompts file, prompt count); the message names the file or flag."""


# --------------------------------------------------------------------------------------------------- inputs


def list_images(folder: str | os.PathLike, flag: str) -> list[Path]:
    """The images directly inside `folder`, sorted by file name (the order a prompts file follows)."""
    path = Path(folder)
    if not path.exists():
        raise EvalError(f"{flag}: folder '{folder}' does not exist")
    if not path.is_dir():
        raise EvalError(f"{flag}: '{folder}' is not a folder")
    images = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                    key=lambda p: p.name)
    if not images:
        raise EvalError(f"{flag}: folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def read_prompts_file(path: str | os.PathLike, expected: int) -> list[str]:
    """One prompt per line, blank lines ignored; there must be exactly one per generated image."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"--prompts: file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--prompts: cannot read '{path}' ({e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(prompts) != expected:
        raise EvalError(f"--prompts: '{path}' has {len(prompts)} prompts but the generated folder has {expected} "
                        "images; give one line per generated image, in sorted file-name order")
    return prompts


def prompts_from_images(paths: Sequence[Path]) -> list[str | None]:
    """The `prompt` chunk of each image (as our generator writes it; A1111's `parameters` also work), or None."""
    prompts: list[str | None] = []
    for p in paths:
        info = read_png_info(p) if p.suffix.lower() == ".png" else None
        prompts.append(info.prompt if info is not None and info.prompt.strip() else None)
    return prompts


def resolve_prompts(prompts: PromptsArg, generated: Sequence[Path]) -> list[str | None]:
    """Prompts for the generated images: a file path, a list (one per image) or, with None, the PNG chunks."""
    if prompts is None:
        return prompts_from_images(generated)
    if isinstance(prompts, (str, os.PathLike)):
        return list(read_prompts_file(prompts, len(generated)))
    prompts = list(prompts)
    if len(prompts) != len(generated):
        raise EvalError(f"got {len(prompts)} prompts for {len(generated)} generated images; give one per image")
    return prompts


_LOAD_CHUNK = 32  # images decoded at a time: a few hundred 1024-px photos would otherwise sit in memory at once


def _embed_paths(paths: Sequence[Path], *models: EmbeddingModel | None) -> list[torch.Tensor | None]:
    """Each model's embeddings of the images, decoding them chunk by chunk and once for all models."""
    parts: list[list[torch.Tensor]] = [[] for _ in models]
    for start in range(0, len(paths), _LOAD_CHUNK):
        # load_image applies EXIF orientation and reads HEIC, so phone photos serve as the real set as they are
        pixels = [load_image(str(p)).rgb for p in paths[start:start + _LOAD_CHUNK]]
        for model, out in zip(models, parts):
            if model is not None:
                out.append(model.embed_images(pixels))
    return [torch.cat(out) if model is not None else None for model, out in zip(models, parts)]


def _check_folders(*flag_and_folder: tuple[str, str | os.PathLike]) -> None:
    # before any model loads: a typo in a folder should cost a second, not a model load
    for flag, folder in flag_and_folder:
        list_images(folder, flag)


def _log_skips(dino: EmbeddingModel | None, clip: EmbeddingModel | None) -> None:
    # one line per missing model, once per evaluation: a skipped metric is a choice, not an error
    if dino is None:
        logger.info("DINO skipped: no %s", DINO_FLAG)
    if clip is None:
        logger.info("CLIP-I and CLIP-T skipped: no %s", CLIP_FLAG)


def _resolve_model(model: ModelArg, kind: str, device: str | None, batch_size: int) -> EmbeddingModel | None:
    if model is None or hasattr(model, "embed_images"):  # already loaded (duck-typed: `name` is optional)
        return model  # type: ignore[return-value]
    loader = load_dino_model if kind == "dino" else load_clip_model
    return loader(model, device=device, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------- scoring


@dataclass
class RealEmbeddings:
    """The real set's embeddings, computed once and reused for the LoRA and the baseline folder."""

    dino: torch.Tensor | None
    clip: torch.Tensor | None
    count: int
    folder: str


def embed_real(real_dir: str | os.PathLike, dino: EmbeddingModel | None,
               clip: EmbeddingModel | None) -> RealEmbeddings:
    """Embed the real photos with whichever models are given."""
    paths = list_images(real_dir, "--real_dir")
    dino_embs, clip_embs = _embed_paths(paths, dino, clip)
    return RealEmbeddings(
        dino=dino_embs,
        clip=clip_embs,
        count=len(paths),
        folder=str(real_dir),
    )


def score_generated(generated_dir: str | os.PathLike, real: RealEmbeddings, dino: EmbeddingModel | None,
                    clip: EmbeddingModel | None, prompts: PromptsArg = None, rare_token: str | None = None,
                    generated_flag: str = "--generated_dir") -> dict[str, Any]:
    """The report of one generated folder against already embedded real images."""
    paths = list_images(generated_dir, generated_flag)
    rows: list[dict[str, Any]] = [{"file": p.name} for p in paths]
    report: dict[str, Any] = {
        "dino": None, "clip_i": None, "clip_t": None,
        "num_generated": len(paths), "num_real": real.count, "num_prompts": 0,
        "generated_dir": str(generated_dir), "real_dir": real.folder, "rare_token": rare_token,
        "models": {"dino": getattr(dino, "name", None), "clip": getattr(clip, "name", None)},
    }
    can_embed_text = clip is not None and callable(getattr(clip, "embed_texts", None))
    found = resolve_prompts(prompts, paths) if can_embed_text else None  # bad prompts fail before any embedding
    if found is not None:
        _check_prompt_coverage(found, paths, generated_flag)
    dino_embs, clip_embs = _embed_paths(paths, dino, clip)

    if dino is not None and real.dino is not None:
        report["dino"] = mean_pairwise_cosine(dino_embs, real.dino)
        for row, value in zip(rows, per_image_cosine(dino_embs, real.dino)):
            row["dino"] = value

    if clip is not None and real.clip is not None:
        report["clip_i"] = mean_pairwise_cosine(clip_embs, real.clip)
        for row, value in zip(rows, per_image_cosine(clip_embs, real.clip)):
            row["clip_i"] = value
        report["clip_t"], report["num_prompts"] = _clip_t(clip, clip_embs, paths, rows, found, rare_token)

    report["images"] = rows
    return report


def _check_prompt_coverage(found: Sequence[str | None], paths: Sequence[Path], flag: str) -> None:
    missing = [p.name for p, text in zip(paths, found) if text is None]
    if missing and len(missing) < len(paths):
        # scoring only some images would make CLIP-T incomparable between runs; ask for a complete prompt list
        raise EvalError(f"{flag}: {len(missing)} of {len(paths)} images have no 'prompt' chunk "
                        f"(first: '{missing[0]}'); give --prompts with one line per image")


def _clip_t(clip: EmbeddingModel, gen: torch.Tensor, paths: Sequence[Path], rows: list[dict[str, Any]],
            found: list[str | None] | None, rare_token: str | None) -> tuple[float | None, int]:
    if found is None:
        logger.info("CLIP-T skipped: the CLIP model given cannot embed text")
        return None, 0
    if all(text is None for text in found):
        logger.info("CLIP-T skipped: the generated images carry no 'prompt' chunk and no --prompts was given")
        return None, 0
    texts = [strip_token(t, rare_token) for t in found]  # type: ignore[arg-type]
    values = paired_cosine(gen, clip.embed_texts(texts))
    for row, prompt, text, value in zip(rows, found, texts, values):
        row.update(prompt=prompt, clip_t_prompt=text, clip_t=value)
    return float(np.mean(values)), len(values)


def evaluate_folders(generated_dir: str | os.PathLike, real_dir: str | os.PathLike, dino_model: ModelArg = None,
                     clip_model: ModelArg = None, prompts: PromptsArg = None, rare_token: str | None = None, *,
                     device: str | None = "cpu", batch_size: int = 16) -> dict[str, Any]:
    """Score the generated images against the real ones.

    `dino_model` / `clip_model` are local model folders or already loaded embedders (load once when scoring several
    folders). `prompts` is a prompts file, a list (one per generated image, sorted file-name order) or None to read
    each PNG's `prompt` chunk. `rare_token` is removed from the prompts before CLIP-T.
    """
    _check_folders(("--generated_dir", generated_dir), ("--real_dir", real_dir))
    dino = _resolve_model(dino_model, "dino", device, batch_size)
    clip = _resolve_model(clip_model, "clip", device, batch_size)
    _log_skips(dino, clip)
    real = embed_real(real_dir, dino, clip)
    return score_generated(generated_dir, real, dino, clip, prompts=prompts, rare_token=rare_token)


def evaluate_with_baseline(generated_dir: str | os.PathLike, baseline_dir: str | os.PathLike,
                           real_dir: str | os.PathLike, dino_model: ModelArg = None, clip_model: ModelArg = None,
                           prompts: PromptsArg = None, baseline_prompts: PromptsArg = None,
                           rare_token: str | None = None, *, device: str | None = "cpu",
                           batch_size: int = 16) -> dict[str, Any]:
    """The LoRA report with `baseline` (the base model's report: same prompts and seeds, multiplier 0) and `gain`
    added. Models load once and the real set is embedded once."""
    _check_folders(("--generated_dir", generated_dir), ("--baseline_dir", baseline_dir), ("--real_dir", real_dir))
    dino = _resolve_model(dino_model, "dino", device, batch_size)
    clip = _resolve_model(clip_model, "clip", device, batch_size)
    _log_skips(dino, clip)
    real = embed_real(real_dir, dino, clip)
    report = score_generated(generated_dir, real, dino, clip, prompts=prompts, rare_token=rare_token)
    base = score_generated(baseline_dir, real, dino, clip, prompts=baseline_prompts if baseline_prompts is not None
                           else prompts, rare_token=rare_token, generated_flag="--baseline_dir")
    report["baseline"] = base
    report["gain"] = compare_reports(report, base)
    return report


def compare_reports(lora_report: dict[str, Any], base_report: dict[str, Any]) -> dict[str, float | None]:
    """The LoRA's gain over the base model per metric (lora - base); None where either side lacks the metric."""
    gains: dict[str, float | None] = {}
    for name in METRICS:
        a, b = lora_report.get(name), base_report.get(name)
        gains[name] = float(a) - float(b) if a is not None and b is not None else None
    return gains


# --------------------------------------------------------------------------------------------------- output


def format_summary(report: dict[str, Any]) -> str:
    """A few readable lines: counts, then each metric (and its gain when a baseline was scored)."""
    lines = [f"generated: {report['num_generated']} images in {report['generated_dir']}",
             f"real:      {report['num_real']} images in {report['real_dir']}"]
    gain = report.get("gain") or {}
    labels = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
    for name in METRICS:
        value = report.get(name)
        text = "skipped" if value is None else f"{value:.4f}"
        if value is not None and gain.get(name) is not None:
            text += f"  (base {report['baseline'][name]:.4f}, gain {gain[name]:+.4f})"
        if name == "clip_t" and value is not None:
            text += f"  over {report['num_prompts']} prompts"
        lines.append(f"{labels[name]:<7}{text}")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN is not JSON; a NaN score means "undefined" (e.g. an all-zero embedding)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as JSON, atomically (temp file + rename), so a crash never leaves half a report."""
    path = Path(path)
    write_text_atomic(path, json.dumps(_json_safe(report), indent=2, ensure_ascii=False) + "\n", newline=None)
    return path


__all__ = [
    "EvalError",
    "RealEmbeddings",
    "compare_reports",
    "embed_real",
    "evaluate_folders",
    "evaluate_with_baseline",
    "format_summary",
    "list_images",
    "prompts_from_images",
    "read_prompts_file",
    "resolve_prompts",
    "score_generated",
    "write_report_json",
]
