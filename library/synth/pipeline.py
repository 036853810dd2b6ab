"""The synthesis run: records -> plan -> (conditioning, optional LoRA training) -> generation -> filter -> records.

Every sample i (0-based) is fixed by the arguments alone: its source is record i mod len(records), its seed is
derive_seed(--seed, i), its name synthetic_{i+1:04d}. So a rerun with the same arguments recognises finished
samples (image on disk and a record with the same fingerprint) and generates nothing new, and an interrupted run
continues where it stopped. The output record files are rewritten atomically after every sample.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from library.data.control_maps import save_png_atomic
from library.errors import UserError
from library.sample.generation import derive_seed
from library.synth import backends, conditioning, filtering, prompts, records, training
from library.synth.yolo_labels import YoloLabelWriter

logger = logging.getLogger(__name__)

KEPT_FILE = "predictions.jsonl"
FILTERED_FILE = "filtered.jsonl"
IMAGES_DIR = "images"
FILTERED_DIR = "filtered"
CONDITIONS_DIR = "controlnet_conditions"


@dataclass
class SynthOptions:
    predictions: str
    output_dir: str
    model: str
    num_samples: int
    images_root: str | None = None
    steps: int = 30
    resolution: int = 1024
    scale: float | None = None  # None: the backend's default (SDXL 7.5, FLUX 3.5)
    backend: str = "sdxl"
    ae: str | None = None  # FLUX single-file parts, as flux_gen_img.py's flags
    clip_l: str | None = None
    t5xxl: str | None = None
    t5xxl_max_token_length: int | None = None
    control_net_model: str | None = None  # diffusers ControlNet / ControlNet-Union / FLUX ControlNet folder
    control_net_types: list[str] = field(default_factory=list)  # its guide types (union: its modes)
    control_net_weight: float = 1.0
    yolo_labels: bool = False
    sampler: str = "euler_a"
    negative_prompt: str | None = None
    controlnet_types: list[str] = field(default_factory=lambda: ["canny"])
    canny_thresholds: tuple[int, int] = conditioning.DEFAULT_CANNY_THRESHOLDS
    depth_model: str | None = None
    lora_path: str | None = None
    lora_multiplier: float = 1.0
    skip_training: bool = False
    train_steps: int = 20
    train_lr: float = 1e-4
    train_dim: int = 8
    lllite_path: str | None = None
    lllite_multiplier: float = 1.0
    filter_spec: str | None = None
    yolo: str | None = None  # YOLO weights when --yolo is given
    iou: float = 0.5
    min_score: float = 0.0
    on_error: str = "skip"
    seed: int = 0
    prompt_template: str = prompts.DEFAULT_TEMPLATE
    device: str | None = None
    precision: str = "fp32"
    tokenizer_cache_dir: str | None = None


@dataclass
class SamplePlan:
    index: int
    name: str
    source: records.SourceRecord
    source_size: tuple[int, int]
    size: tuple[int, int]
    prompt: str
    seed: int
    fingerprint: str


@dataclass
class RunSummary:
    planned: int = 0
    generated: int = 0
    reused: int = 0
    kept: int = 0
    filtered: int = 0
    skipped_records: list[records.RecordProblem] = field(default_factory=list)
    lora_path: str | None = None


def check_options(o: SynthOptions) -> None:
    """Option mistakes are reported before any image is read or model loaded."""
    if o.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {o.num_samples}")
    if o.steps < 1:
        raise UserError(f"--steps must be at least 1, got {o.steps}")
    if o.on_error not in ("skip", "fail"):
        raise UserError(f"--on_error must be 'skip' or 'fail', got {o.on_error!r}")
    if o.lora_path and o.skip_training:
        raise UserError("give --lora_path or --skip_training, not both")
    if o.lora_path and not os.path.isfile(o.lora_path):
        raise UserError(f"--lora_path '{o.lora_path}': no such file")
    if o.lllite_path and not os.path.isfile(o.lllite_path):
        raise UserError(f"--lllite_path '{o.lllite_path}': no such file")
    if not o.lora_path and not o.skip_training and o.train_steps < 1:
        raise UserError(f"--train_steps must be at least 1, got {o.train_steps}")
    if not 0.0 <= o.iou <= 1.0:
        raise UserError(f"--iou must be between 0 and 1, got {o.iou}")
    if o.filter_spec and o.yolo:
        raise UserError("give --filter or --yolo, not both")
    if "depth" in o.controlnet_types and not o.depth_model:
        raise UserError("--controlnet_types depth needs --depth_model (a local transformers depth model folder)")
    backend = backends.get_backend(o.backend)
    if o.lllite_path and not backend.lllite:
        raise UserError(f"--lllite_path: ControlNet-LLLite is for SDXL; the {o.backend} backend cannot use it "
                        "(use --control_net_model)")
    for flag, value in (("--ae", o.ae), ("--clip_l", o.clip_l), ("--t5xxl", o.t5xxl)):
        if value and o.backend != "flux":
            raise UserError(f"{flag} is a FLUX model flag: add --backend flux")
        if value and not os.path.isfile(value):
            raise UserError(f"{flag} '{value}': no such file")
    if o.control_net_weight < 0:
        raise UserError(f"--control_net_weight must not be negative, got {o.control_net_weight}")
    guide_types, _ = controlnet_guides(o)
    if "depth" in guide_types and not o.depth_model:
        raise UserError("--control_net_types depth needs --depth_model (a local transformers depth model folder)")
    if o.precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"unknown precision {o.precision!r}")
    prompts.check_template(o.prompt_template)
    conditioning.output_size(1, 1, o.resolution)  # validates the resolution


def controlnet_guides(o: SynthOptions) -> tuple[list[str], bool]:
    """(conditioning types guiding --control_net_model, one per input; whether it is a union model)."""
    return backends.controlnet_guide_types(o.control_net_model, o.control_net_types, o.controlnet_types,
                                           backends.get_backend(o.backend))


def guiding_types(o: SynthOptions) -> list[str]:
    """The conditioning types that steer the image (LLLite's canny, the ControlNet's inputs), in order."""
    types = ["canny"] if o.lllite_path else []
    return list(dict.fromkeys(types + controlnet_guides(o)[0]))


def effective_scale(o: SynthOptions) -> float:
    return o.scale if o.scale is not None else backends.get_backend(o.backend).default_scale


def sample_name(index: int, total: int) -> str:
    return f"synthetic_{index + 1:0{max(4, len(str(total)))}d}"


def _fingerprint(o: SynthOptions, source: records.SourceRecord, prompt: str, seed: int, size: tuple[int, int],
                 lora: str | None) -> str:
    """What decides the pixels of one sample; a finished sample is reused only when it matches."""
    parts = [source.image_id, source.image_path, prompt, seed, size, o.steps, effective_scale(o), o.sampler,
             o.negative_prompt, os.path.abspath(o.model), lora, o.lora_multiplier, o.lllite_path, o.lllite_multiplier,
             o.precision, o.canny_thresholds, o.filter_spec, o.yolo, o.iou, o.min_score]
    if o.backend != "sdxl" or o.control_net_model:  # appended only when used: earlier SDXL outputs stay valid
        parts += [o.backend, o.ae, o.clip_l, o.t5xxl, o.t5xxl_max_token_length,
                  o.control_net_model and os.path.abspath(o.control_net_model), o.control_net_types,
                  o.control_net_weight, o.depth_model if "depth" in guiding_types(o) else None]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image '{path}': {exc}") from None


def plan_samples(o: SynthOptions, sources: list[records.SourceRecord], lora: str | None) -> list[SamplePlan]:
    sizes: dict[str, tuple[int, int]] = {}
    plans = []
    for i in range(o.num_samples):
        src = sources[i % len(sources)]
        if src.image_path not in sizes:
            sizes[src.image_path] = _image_size(src.image_path)
        src_size = sizes[src.image_path]
        size = conditioning.output_size(*src_size, o.resolution)
        prompt = prompts.build_prompt(o.prompt_template, src.labels)
        seed = derive_seed(o.seed, i)
        plans.append(SamplePlan(i, sample_name(i, o.num_samples), src, src_size, size, prompt, seed,
                                _fingerprint(o, src, prompt, seed, size, lora)))
    return plans


def load_sources(o: SynthOptions, summary: RunSummary) -> list[records.SourceRecord]:
    sources, problems = records.read_predictions(o.predictions, o.images_root)
    records.check_problems(o.predictions, sources, problems, o.on_error)
    for p in problems:
        logger.warning("%s: skipped %s", o.predictions, p)
    summary.skipped_records = problems
    return sources


class OutputStore:
    """The output folder: finished samples from earlier runs, and atomic record files."""

    def __init__(self, root: Path):
        self.root = root
        for sub in (IMAGES_DIR, FILTERED_DIR):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        for name in (KEPT_FILE, FILTERED_FILE):
            for rec in records.read_jsonl_lenient(str(root / name)):
                if isinstance(rec.get("image_id"), str) and isinstance(rec.get("synthetic"), dict):
                    self.records[rec["image_id"]] = rec

    def finished(self, plan: SamplePlan) -> bool:
        rec = self.records.get(plan.name)
        if rec is None or rec["synthetic"].get("fingerprint") != plan.fingerprint:
            return False
        return (self.root / rec["raw"]["meta"]["rel_path"]).is_file()

    def image_path(self, plan: SamplePlan, kept: bool) -> tuple[Path, str]:
        rel = f"{IMAGES_DIR if kept else FILTERED_DIR}/{plan.name}.png"
        return self.root / rel, rel

    def condition_path(self, plan: SamplePlan, kind: str) -> Path:
        folder = self.root / CONDITIONS_DIR / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{plan.name}_{kind}.png"

    def commit(self, plans: list[SamplePlan], record: dict[str, Any]) -> None:
        """Store one record and rewrite both files (only this run's planned samples, in sample order)."""
        self.records[record["image_id"]] = record
        ordered = [self.records[p.name] for p in plans if p.name in self.records
                   and self.records[p.name]["synthetic"].get("fingerprint") == p.fingerprint]
        records.write_jsonl_atomic(str(self.root / KEPT_FILE), [r for r in ordered if r["synthetic"]["kept"]])
        records.write_jsonl_atomic(str(self.root / FILTERED_FILE), [r for r in ordered if not r["synthetic"]["kept"]])


def make_conditions(plans: list[SamplePlan], store: OutputStore,
                    makers: dict[str, Callable[[Image.Image], Image.Image]]) -> dict[str, dict[str, Path]]:
    """Per sample and type, the conditioning image at the generation size (computed once per source and size)."""
    cache: dict[tuple[str, tuple[int, int], str], Image.Image] = {}
    paths: dict[str, dict[str, Path]] = {}
    for plan in plans:
        paths[plan.name] = {}
        for kind, make in makers.items():
            target = store.condition_path(plan, kind)
            paths[plan.name][kind] = target
            if target.is_file() and store.finished(plan):
                continue
            key = (plan.source.image_path, plan.size, kind)
            if key not in cache:
                source = conditioning.load_source(plan.source.image_path).resize(plan.size, Image.Resampling.LANCZOS)
                cache[key] = make(source)
            save_png_atomic(cache[key], str(target))
    return paths


def _detector(o: SynthOptions) -> filtering.Detector | None:
    if o.filter_spec:
        return filtering.load_detector(o.filter_spec)
    if o.yolo:
        return filtering.YoloDetector(o.yolo, o.device)
    return None


def _resolve_lora(o: SynthOptions, sources: list[records.SourceRecord], out: Path) -> str | None:
    if o.lora_path:
        return os.path.abspath(o.lora_path)
    if o.skip_training:
        return None
    unique = list(dict.fromkeys(s.image_path for s in sources))
    caption = {s.image_path: prompts.build_prompt(o.prompt_template, s.labels) for s in sources}
    files = (("ae", o.ae and os.path.abspath(o.ae)), ("clip_l", o.clip_l and os.path.abspath(o.clip_l)),
             ("t5xxl", o.t5xxl and os.path.abspath(o.t5xxl)), ("t5xxl_max_token_length", o.t5xxl_max_token_length))
    settings = training.TrainingSettings(model=os.path.abspath(o.model), resolution=o.resolution,
                                         steps=o.train_steps, learning_rate=o.train_lr, network_dim=o.train_dim,
                                         seed=o.seed, backend=o.backend,
                                         model_files=tuple((k, v) for k, v in files if v is not None))
    return training.train_lora(out / "lora", [(os.path.abspath(p), caption[p]) for p in unique], settings)


class Generator:
    """The backend's generator (sdxl_gen_img.py's or flux_gen_img.py's), loaded once and fed one request per sample.

    LLLite is guided by the sample's canny map; a pretrained ControlNet by its guide types' maps (one per input)."""

    def __init__(self, o: SynthOptions, lora: str | None, staging: Path):
        from library.sample.controlnets import ControlNetSpec
        from library.sample.generation import GenerationConfig, LLLiteSpec, NetworkSpec, resolve_device

        backend = backends.get_backend(o.backend)
        self.guide_types, union = controlnet_guides(o)
        controlnets = []
        if o.control_net_model:
            controlnets = [ControlNetSpec(o.control_net_model, ("per-sample",) * len(self.guide_types),
                                          o.control_net_weight, 1.0, tuple(self.guide_types) if union else ())]
        self.config = GenerationConfig(
            model=o.model, outdir=str(staging), prompts=[], width=o.resolution, height=o.resolution,
            steps=o.steps, scale=effective_scale(o), seed=o.seed, sampler=o.sampler, device=o.device,
            dtype=o.precision, networks=[NetworkSpec(backend.network_module, lora, o.lora_multiplier)] if lora else [],
            lllite=[LLLiteSpec(o.lllite_path, o.lllite_multiplier)] if o.lllite_path else [],
            tokenizer_cache_dir=o.tokenizer_cache_dir, controlnets=controlnets)
        files = backends.ModelFiles(o.model, o.ae, o.clip_l, o.t5xxl, o.t5xxl_max_token_length, o.tokenizer_cache_dir)
        if o.negative_prompt and not backend.negative_prompt:
            logger.warning("--negative_prompt: the %s backend uses no negative prompt; it is ignored", o.backend)
        self.generator = backend.load(files, self.config, resolve_device(o.device))
        self.negative = o.negative_prompt if backend.negative_prompt else None
        self.lllite = bool(o.lllite_path)

    def __call__(self, plan: SamplePlan, conditions: dict[str, Path]) -> Path:
        from library.sample.generation import ImageRequest

        w, h = plan.size
        guides = (tuple(str(conditions[t]) for t in self.guide_types),) if self.guide_types else None
        request = ImageRequest(index=plan.index, prompt=plan.prompt, negative_prompt=self.negative or None,
                               seed=plan.seed, width=w, height=h, steps=self.config.steps, scale=self.config.scale,
                               original_size=(w, h), control_image=str(conditions["canny"]) if self.lllite else None,
                               controlnet_images=guides)
        (path,) = self.generator.generate([request])
        return Path(path)


def run(o: SynthOptions, detector_factory: Callable[[SynthOptions], filtering.Detector | None] = _detector
        ) -> RunSummary:
    check_options(o)
    summary = RunSummary()
    sources = load_sources(o, summary)
    detector = detector_factory(o)
    out = Path(o.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # LLLite is guided by the source's canny map, a ControlNet by its guide types' maps: make those too
    types = list(dict.fromkeys(guiding_types(o) + list(o.controlnet_types)))
    from library.sample.generation import resolve_device

    makers = conditioning.build_makers(types, o.depth_model, o.canny_thresholds, str(resolve_device(o.device)))
    lora = _resolve_lora(o, sources, out)
    summary.lora_path = lora
    plans = plan_samples(o, sources, lora)
    summary.planned = len(plans)
    store = OutputStore(out)
    condition_paths = make_conditions(plans, store, makers)
    pending = [p for p in plans if not store.finished(p)]
    summary.reused = len(plans) - len(pending)
    if pending:
        staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=out))
        try:
            generate = Generator(o, lora, staging)
            for plan in pending:
                logger.info("%s: '%s' (source %s, seed %d)", plan.name, plan.prompt, plan.source.image_id, plan.seed)
                _one_sample(o, plan, store, plans, generate, detector, condition_paths[plan.name], lora)
                summary.generated += 1
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    labels = YoloLabelWriter(out, sources) if o.yolo_labels else None
    for p in plans:
        rec = store.records.get(p.name)
        if rec is not None:
            kept = rec["synthetic"]["kept"]
            summary.kept += kept
            summary.filtered += not kept
            if labels is not None:
                labels.write(p.name, p.source.task, records.scaled_boxes(p.source, p.size, p.source_size), p.size,
                             kept)
    return summary


def _one_sample(o: SynthOptions, plan: SamplePlan, store: OutputStore, plans: list[SamplePlan],
                generate: Callable[[SamplePlan, dict[str, Path]], Path], detector: filtering.Detector | None,
                conditions: dict[str, Path], lora: str | None) -> None:
    staged = generate(plan, conditions)
    boxes = records.scaled_boxes(plan.source, plan.size, plan.source_size)
    result = None
    if detector is not None:
        with Image.open(staged) as im:
            dets = filtering.check_detections(detector(im.convert("RGB")), f"detector on {plan.name}")
        result = filtering.match_boxes(boxes, plan.source.labels, dets, o.iou, o.min_score)
    kept = result is None or result.kept
    target, rel = store.image_path(plan, kept)
    other, _ = store.image_path(plan, not kept)
    other.unlink(missing_ok=True)  # a stale image of an earlier run with other settings
    os.replace(staged, target)
    synthetic = {
        "source_image_id": plan.source.image_id, "source_line": plan.source.line_no, "prompt": plan.prompt,
        "seed": plan.seed, "steps": o.steps, "width": plan.size[0], "height": plan.size[1],
        "kept": kept, "filter": result.as_dict() if result else None,
        "conditions": {k: str(p.relative_to(store.root)) for k, p in conditions.items()},
        "lora": lora, "fingerprint": plan.fingerprint,
    }
    generation = records.generation_meta(plan.source.image_id, lora, guiding_types(o), plan.prompt, plan.seed)
    rec = records.synthetic_record(plan.source, plan.name, str(target), rel, str(store.root), plan.size,
                                   plan.source_size, synthetic, generation)
    store.commit(plans, rec)
