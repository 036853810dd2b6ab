"""Optional LoRA training on the source images, through the backend's trainer script run as a subprocess
(`sdxl_train_network.py` or `flux_train_network.py`; the `TRAINERS` table says which and with what network module).

A subprocess rather than an import: the trainer owns its process (accelerate state, seeds, memory), and users can
rerun the exact command from the TOML files this module writes next to the LoRA.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError
from library.fileio import write_text_atomic
from library.synth.conditioning import SIZE_STEP

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LORA_NAME = "synth_lora"


@dataclass(frozen=True)
class Trainer:
    """How one backend trains a LoRA: the script, its network module, and which extra model files it takes."""

    script: str
    network_module: str
    model_files: tuple[str, ...] = ()  # keys of TrainingSettings.model_files passed on as TOML values


TRAINERS: dict[str, Trainer] = {
    "sdxl": Trainer("sdxl_train_network.py", "networks.lora"),
    "flux": Trainer("flux_train_network.py", "networks.lora_flux", ("ae", "clip_l", "t5xxl", "t5xxl_max_token_length")),
}
TRAIN_SCRIPT = REPO / TRAINERS["sdxl"].script  # kept for callers that predate the table


class TrainingError(UserError):
    """The LoRA training subprocess failed; the message carries the end of its error output."""


@dataclass(frozen=True)
class TrainingSettings:
    model: str
    resolution: int
    steps: int
    learning_rate: float = 1e-4
    network_dim: int = 8
    seed: int = 0
    backend: str = "sdxl"
    model_files: tuple[tuple[str, object], ...] = ()  # e.g. (("ae", "/m/ae.safetensors"),) for FLUX single files


def trainer_for(backend: str) -> Trainer:
    if backend not in TRAINERS:
        raise UserError(f"no LoRA trainer for backend '{backend}'; expected one of {', '.join(TRAINERS)}")
    return TRAINERS[backend]


def _toml_value(v) -> str:
    return json.dumps(v)  # JSON strings/numbers/bools are valid TOML basic values


def write_training_inputs(work_dir: Path, sources: list[tuple[str, str]], settings: TrainingSettings) -> Path:
    """Copy the sources with caption files into work_dir/images and write dataset.toml + run.toml; returns run.toml.

    `sources` is a list of (image path, caption). Copies keep the trainer's dataset independent of where the
    predictions file's images live (relative paths, several roots)."""
    images = work_dir / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)
    for k, (path, caption) in enumerate(sources, start=1):
        ext = os.path.splitext(path)[1].lower() or ".png"
        shutil.copyfile(path, images / f"source_{k:05d}{ext}")
        (images / f"source_{k:05d}.txt").write_text(caption + "\n", encoding="utf-8")
    dataset = work_dir / "dataset.toml"
    dataset.write_text(
        "[general]\ncaption_extension = \".txt\"\nenable_bucket = true\n"
        f"min_bucket_reso = {SIZE_STEP}\nmax_bucket_reso = {settings.resolution * 2}\n"
        f"bucket_reso_steps = {SIZE_STEP}\n\n[[datasets]]\nresolution = {settings.resolution}\nbatch_size = 1\n\n"
        f"  [[datasets.subsets]]\n  image_dir = {_toml_value(str(images))}\n  num_repeats = 1\n",
        encoding="utf-8")
    trainer = trainer_for(settings.backend)
    files = {k: v for k, v in settings.model_files if k in trainer.model_files and v is not None}
    values = dict(pretrained_model_name_or_path=settings.model, **files, dataset_config=str(dataset),
                  output_dir=str(work_dir), output_name=LORA_NAME, network_module=trainer.network_module,
                  network_dim=settings.network_dim, network_alpha=float(settings.network_dim),
                  learning_rate=settings.learning_rate, max_train_steps=settings.steps, seed=settings.seed,
                  optimizer_type="AdamW", save_model_as="safetensors")
    run = work_dir / "run.toml"
    run.write_text("[model]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()), encoding="utf-8")
    return run


def fingerprint(sources: list[tuple[str, str]], settings: TrainingSettings) -> str:
    h = hashlib.sha256(json.dumps([sources, settings.__dict__], sort_keys=True).encode())
    return h.hexdigest()[:16]


def train_lora(work_dir: Path, sources: list[tuple[str, str]], settings: TrainingSettings) -> str:
    """Train (or reuse a finished earlier training with the same inputs); returns the LoRA file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    lora = work_dir / f"{LORA_NAME}.safetensors"
    done = work_dir / "done.json"
    key = fingerprint(sources, settings)
    if lora.is_file() and done.is_file():
        try:
            if json.loads(done.read_text(encoding="utf-8")).get("fingerprint") == key:
                logger.info("reusing the LoRA trained earlier: %s", lora)
                return str(lora)
        except (OSError, json.JSONDecodeError):
            pass
    done.unlink(missing_ok=True)
    run = write_training_inputs(work_dir, sources, settings)
    cmd = [sys.executable, str(REPO / trainer_for(settings.backend).script), "--config_file", str(run)]
    logger.info("training a LoRA for %d step(s): %s", settings.steps, " ".join(cmd))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, cwd=str(work_dir), env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not lora.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise TrainingError(f"LoRA training failed (exit {proc.returncode}); config {run}:\n{tail}")
    write_text_atomic(done, json.dumps({"fingerprint": key}), newline=None)
    return str(lora)
