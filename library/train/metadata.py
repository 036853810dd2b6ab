"""The `ss_*` training metadata written into network files, key for key as sd-scripts' train_network.py writes it.

Model sites and UIs (civitai, A1111's additional-networks, kohya's metadata editor) read these keys to show the
training details and the trigger words (`ss_tag_frequency`), so the names and the value formats are sd-scripts':
every value is `str()` of the Python value (None -> "None", True -> "True"), nested values are JSON.

Which keys: the common set of train_network.py, the FLUX trainer's extras, then either the per-dataset JSON
(`ss_datasets`, `ss_tag_frequency`, `ss_dataset_dirs`) when a dataset TOML is used or the flat dataset keys of the
command-line dataset form (`ss_resolution`, `ss_bucket_info`, `ss_dataset_dirs`, `ss_reg_dataset_dirs`, ...), the
model names and hashes, and per save `ss_training_finished_at` / `ss_steps` / `ss_epoch`. With `--no_metadata`,
sd-scripts keeps only the few keys a loader needs (MINIMUM_KEYS), and so do we. `ss_sd_scripts_commit_hash` holds
our own version, the closest honest value.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import time
from collections import Counter
from typing import Any

from library.config.train_config import RunConfig
from library.train.optim import optimizer_name

_START = time.time()
_SESSION_ID = random.randint(0, 2**32)  # one per run: tells which files came from the same training
# what sd-scripts writes as ss_base_model_version, per family
BASE_MODEL_VERSIONS = {"sdxl": "sdxl_base_v1-0", "flux": "flux1"}
# sd-scripts' SS_METADATA_MINIMUM_KEYS: what --no_metadata keeps
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
# (key, flag) pairs whose value is the flag's, as given; the default applies where this build lacks the flag
_FLAG_KEYS: tuple[tuple[str, str, Any], ...] = (
    ("ss_output_name", "output_name", None),
    ("ss_learning_rate", "learning_rate", None),
    ("ss_unet_lr", "unet_lr", None),
    ("ss_gradient_checkpointing", "gradient_checkpointing", False),
    ("ss_gradient_accumulation_steps", "gradient_accumulation_steps", 1),
    ("ss_lr_warmup_steps", "lr_warmup_steps", 0),
    ("ss_lr_scheduler", "lr_scheduler", "constant"),
    ("ss_network_dim", "network_dim", None),
    ("ss_network_alpha", "network_alpha", 1.0),
    ("ss_network_dropout", "network_dropout", None),
    ("ss_mixed_precision", "mixed_precision", "no"),
    ("ss_clip_skip", "clip_skip", None),
    ("ss_max_token_length", "max_token_length", None),
    ("ss_seed", "seed", None),
    ("ss_lowram", "lowram", False),
    ("ss_noise_offset", "noise_offset", None),
    ("ss_multires_noise_iterations", "multires_noise_iterations", None),
    ("ss_multires_noise_discount", "multires_noise_discount", 0.3),
    ("ss_adaptive_noise_scale", "adaptive_noise_scale", None),
    ("ss_zero_terminal_snr", "zero_terminal_snr", False),
    ("ss_training_comment", "training_comment", None),
    ("ss_max_grad_norm", "max_grad_norm", 1.0),
    ("ss_caption_dropout_rate", "caption_dropout_rate", 0.0),
    ("ss_caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs", 0),
    ("ss_caption_tag_dropout_rate", "caption_tag_dropout_rate", 0.0),
    ("ss_face_crop_aug_range", "face_crop_aug_range", None),
    ("ss_prior_loss_weight", "prior_loss_weight", 1.0),
    ("ss_min_snr_gamma", "min_snr_gamma", None),
    ("ss_scale_weight_norms", "scale_weight_norms", None),
    ("ss_ip_noise_gamma", "ip_noise_gamma", None),
    ("ss_noise_offset_random_strength", "noise_offset_random_strength", False),
    ("ss_ip_noise_gamma_random_strength", "ip_noise_gamma_random_strength", False),
    ("ss_loss_type", "loss_type", "l2"),
    ("ss_huber_schedule", "huber_schedule", "snr"),
    ("ss_huber_scale", "huber_scale", 1.0),
    ("ss_huber_c", "huber_c", 0.1),
    ("ss_validation_seed", "validation_seed", None),
    ("ss_validation_split", "validation_split", 0.0),
    ("ss_max_validation_steps", "max_validation_steps", None),
    ("ss_validate_every_n_epochs", "validate_every_n_epochs", None),
    ("ss_validate_every_n_steps", "validate_every_n_steps", None),
    ("ss_resize_interpolation", "resize_interpolation", None),
)
_BOOL_FLAG_KEYS = (("ss_full_fp16", "full_fp16"), ("ss_v2", "v2"), ("ss_cache_latents", "cache_latents"),
                   ("ss_debiased_estimation", "debiased_estimation_loss"), ("ss_fp8_base", "fp8_base"),
                   ("ss_fp8_base_unet", "fp8_base_unet"))
# flux_train_network.py's update_metadata
_FLUX_FLAG_KEYS = (("ss_model_type", "model_type", "flux"), ("ss_apply_t5_attn_mask", "apply_t5_attn_mask", False),
                   ("ss_weighting_scheme", "weighting_scheme", "none"), ("ss_logit_mean", "logit_mean", 0.0),
                   ("ss_logit_std", "logit_std", 1.0), ("ss_mode_scale", "mode_scale", 1.29),
                   ("ss_guidance_scale", "guidance_scale", 3.5), ("ss_timestep_sampling", "timestep_sampling", "sigma"),
                   ("ss_sigmoid_scale", "sigmoid_scale", 1.0),
                   ("ss_model_prediction_type", "model_prediction_type", "sigma_scaled"),
                   ("ss_discrete_flow_shift", "discrete_flow_shift", 3.0))
# the command-line dataset form's flat keys (sd-scripts writes them only without a dataset TOML)
_COMMAND_LINE_FLAG_KEYS = (("ss_resolution", "resolution", None), ("ss_color_aug", "color_aug", False),
                           ("ss_flip_aug", "flip_aug", False), ("ss_random_crop", "random_crop", False),
                           ("ss_shuffle_caption", "shuffle_caption", False), ("ss_keep_tokens", "keep_tokens", 0))


def _arg(cfg: RunConfig, name: str, default: Any = None) -> Any:
    """A flag's value by its sd-scripts name: the typed config first, then the parsed command line."""
    for part in (cfg.model, cfg.training, cfg.optimizer, cfg.network, cfg.cache, cfg.save, cfg.validation,
                 cfg.dataset):
        if hasattr(part, name):
            return getattr(part, name)
    return cfg.raw_args.get(name, default)


def _network_args(cfg: RunConfig) -> dict[str, str]:
    return dict(a.split("=", 1) for a in (cfg.network.network_args or []) if "=" in a)


def _network_module(cfg: RunConfig) -> str | None:
    return cfg.network.network_module if cfg.network_kind == "lora" else "networks.control_net_lllite"


def minimum_metadata(cfg: RunConfig) -> dict[str, str]:
    """The keys sd-scripts keeps with --no_metadata: enough for a UI to load the file as the right network."""
    md: dict[str, Any] = {
        "ss_v2": bool(_arg(cfg, "v2", False)),
        "ss_base_model_version": BASE_MODEL_VERSIONS.get(cfg.family, cfg.family),
        "ss_network_module": _network_module(cfg),
        "ss_network_dim": cfg.network.network_dim,
        "ss_network_alpha": cfg.network.network_alpha,
    }
    if cfg.network.network_args:
        md["ss_network_args"] = json.dumps(_network_args(cfg))
    return {k: str(v) for k, v in md.items()}


def _text_encoder_lr(cfg: RunConfig) -> Any:
    """As sd-scripts records it: the list for networks that take one rate per encoder (FLUX's), else the first."""
    lr = cfg.network.text_encoder_lr
    if isinstance(lr, (list, tuple)) and cfg.family != "flux":
        return lr[0] if lr else None
    return list(lr) if isinstance(lr, tuple) else lr


# ---- datasets ------------------------------------------------------------------------------------------------------


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """sd-scripts' count of the comma-separated tags of a directory's captions (stripped, lower-cased)."""
    counts: Counter = Counter()
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                counts[tag.lower()] += 1
    return dict(counts)


def _subset_dir_name(subset: Any, kind: str) -> str | None:
    if kind == "finetuning" and subset.metadata_file:
        return os.path.basename(subset.metadata_file)
    return os.path.basename(subset.image_dir.rstrip("/\\")) if subset.image_dir else None


def _subset_counts(ds: Any) -> tuple[Counter, dict[int, list[str]]]:
    """(training images per subset, raw captions of all its images per subset), subsets by position."""
    index = {id(sub): i for i, sub in enumerate(ds.config.subsets)}
    train = set(ds.train_indices)
    counts: Counter = Counter()
    captions: dict[int, list[str]] = {}
    for n, item in enumerate(ds.items):
        i = index.get(id(item.subset), item.record.subset_index)
        counts[i] += n in train
        captions.setdefault(i, []).append(item.record.caption)
    return counts, captions


def _bucket_info(ds: Any) -> dict[str, Any] | None:
    """sd-scripts' bucket_info: non-empty buckets by their index among the sorted candidates, with the mean aspect
    error of the images; None without bucketing."""
    cfg = ds.config
    if not cfg.enable_bucket:
        return None
    from library.data.buckets import BucketSpec

    hist = ds.bucket_histogram()
    candidates = sorted(set(map(tuple, BucketSpec.from_dataset(cfg).candidates())) | set(hist))
    buckets = {candidates.index(reso): {"resolution": list(reso), "count": n} for reso, n in sorted(hist.items())}
    errors = [abs(it.bucket[0] / it.bucket[1] - it.original_size[0] / it.original_size[1])
              for it in (ds.items[i] for i in ds.train_indices)]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def _image_counts(ds: Any) -> tuple[int, int]:
    """(training images, regularization images), each times its subset's repeats, as sd-scripts counts them."""
    train = sum(it.subset.num_repeats for it in (ds.items[i] for i in ds.train_indices) if not it.subset.is_reg)
    reg = sum(it.subset.num_repeats for it in (ds.items[i] for i in ds.train_indices) if it.subset.is_reg)
    return train, reg


def _dir_entry(subset: Any, count: int) -> dict[str, int]:
    return {"n_repeats": subset.num_repeats, "img_count": count}


def datasets_metadata(datasets: list[Any]) -> dict[str, str]:
    """`ss_datasets`, `ss_tag_frequency` and `ss_dataset_dirs` of a dataset-TOML run."""
    out, tags, dirs = [], {}, {}
    for ds in datasets:
        cfg = ds.config
        counts, captions = _subset_counts(ds)
        freq: dict[str, dict[str, int]] = {}
        subsets = []
        for i, sub in enumerate(cfg.subsets):
            name = _subset_dir_name(sub, cfg.kind)
            entry: dict[str, Any] = {
                "img_count": counts[i], "num_repeats": sub.num_repeats, "color_aug": bool(sub.color_aug),
                "flip_aug": bool(sub.flip_aug), "random_crop": bool(sub.random_crop),
                "shuffle_caption": bool(sub.shuffle_caption), "keep_tokens": sub.keep_tokens,
                "keep_tokens_separator": sub.keep_tokens_separator, "secondary_separator": sub.secondary_separator,
                "enable_wildcard": bool(sub.enable_wildcard), "caption_prefix": sub.caption_prefix,
                "caption_suffix": sub.caption_suffix, "resize_interpolation": sub.resize_interpolation,
            }
            if sub.image_dir:
                entry["image_dir"] = os.path.basename(sub.image_dir.rstrip("/\\"))
            if cfg.kind == "dreambooth":
                entry["class_tokens"], entry["is_reg"] = sub.class_tokens, sub.is_reg
            elif sub.metadata_file:
                entry["metadata_file"] = os.path.basename(sub.metadata_file)
            subsets.append(entry)
            if name is not None:
                freq.setdefault(name, {})
                for tag, n in tag_frequency(captions.get(i, [])).items():
                    freq[name][tag] = freq[name].get(tag, 0) + n
                if not (cfg.kind == "dreambooth" and sub.is_reg):  # reg dirs are not merged, as in sd-scripts
                    key, k = name, 2
                    while key in dirs:
                        key, k = f"{name} ({k})", k + 1
                    dirs[key] = _dir_entry(sub, counts[i])
        num_train, num_reg = _image_counts(ds)
        interpolations = {sub.resize_interpolation for sub in cfg.subsets}
        out.append({
            "is_dreambooth": cfg.kind == "dreambooth", "batch_size_per_device": cfg.batch_size,
            "num_train_images": num_train, "num_reg_images": num_reg, "resolution": list(cfg.resolution),
            "enable_bucket": bool(cfg.enable_bucket), "min_bucket_reso": cfg.min_bucket_reso,
            "max_bucket_reso": cfg.max_bucket_reso, "tag_frequency": freq, "bucket_info": _bucket_info(ds),
            "resize_interpolation": interpolations.pop() if len(interpolations) == 1 else None,
            "subsets": subsets,
        })
        for name, f in freq.items():  # a directory used by several datasets counts once
            tags.setdefault(name, f)
    return {"ss_datasets": json.dumps(out), "ss_tag_frequency": json.dumps(tags), "ss_dataset_dirs": json.dumps(dirs)}


def command_line_dataset_metadata(cfg: RunConfig, datasets: list[Any], num_processes: int) -> dict[str, Any]:
    """The flat keys sd-scripts writes for the `--train_data_dir` / `--in_json` dataset form (one dataset)."""
    ds = datasets[0]
    dcfg = ds.config
    counts, captions = _subset_counts(ds)
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    freq: dict[str, dict[str, int]] = {}
    for i, sub in enumerate(dcfg.subsets):
        name = _subset_dir_name(sub, dcfg.kind)
        if name is None:
            continue
        (reg_dirs if sub.is_reg else dirs)[name] = _dir_entry(sub, counts[i])
        freq.setdefault(name, {})
        for tag, n in tag_frequency(captions.get(i, [])).items():
            freq[name][tag] = freq[name].get(tag, 0) + n
    batch = _arg(cfg, "train_batch_size", dcfg.batch_size) or dcfg.batch_size
    md: dict[str, Any] = {k: _arg(cfg, flag, default) for k, flag, default in _COMMAND_LINE_FLAG_KEYS}
    for key in ("ss_color_aug", "ss_flip_aug", "ss_random_crop", "ss_shuffle_caption"):
        md[key] = bool(md[key])
    md.update({
        "ss_batch_size_per_device": batch,
        "ss_total_batch_size": batch * num_processes * cfg.training.gradient_accumulation_steps,
        "ss_enable_bucket": bool(dcfg.enable_bucket), "ss_bucket_no_upscale": bool(dcfg.bucket_no_upscale),
        "ss_min_bucket_reso": dcfg.min_bucket_reso, "ss_max_bucket_reso": dcfg.max_bucket_reso,
        "ss_dataset_dirs": json.dumps(dirs), "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(freq), "ss_bucket_info": json.dumps(_bucket_info(ds)),
    })
    return md


def _uses_dataset_toml(cfg: RunConfig) -> bool:
    source = cfg.training.dataset_config
    if hasattr(source, "toml_path"):  # a DatasetSource (it is os.PathLike too, only for TOML sources)
        return source.toml_path is not None
    return source is not None or bool(_arg(cfg, "dataset_config"))


# ---- model names and hashes ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _hashes(path: str, size: int, mtime: float) -> tuple[str, str]:
    """(A1111's old 8-digit hash: sha256 of 64 KiB at 1 MiB, sha256 of the whole file): once per file and run."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        full = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            full.update(chunk)
    return legacy, full.hexdigest()


def model_name_metadata(prefix: str, name: str | None) -> dict[str, str]:
    """`ss_<prefix>_name` (the file name when it exists) and, for a file, its hashes; a folder has no hash."""
    if not name:
        return {}
    out: dict[str, str] = {}
    if os.path.isfile(name):
        st = os.stat(name)
        out[f"ss_{prefix}_hash"], out[f"ss_new_{prefix}_hash"] = _hashes(os.path.abspath(name), st.st_size,
                                                                        st.st_mtime)
    out[f"ss_{prefix}_name"] = os.path.basename(os.path.normpath(name)) if os.path.exists(name) else name
    return out


def _optimizer_label(cfg: RunConfig, session: Any) -> str:
    """sd-scripts' `module.Class(key=value,...)` of the optimizer built (the flag's name when none is at hand)."""
    o = cfg.optimizer
    optimizer = getattr(session, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    if inner is not None:
        name = f"{type(inner).__module__}.{type(inner).__name__}"
    else:
        name = optimizer_name(o)
    return name + (f"({','.join(o.optimizer_args)})" if o.optimizer_args else "")


def _implementation_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"difftune/{version('difftune')}"
    except PackageNotFoundError:
        return "difftune/unknown"


# ---- all together --------------------------------------------------------------------------------------------------


def training_metadata(cfg: RunConfig, datasets: list[Any], state: Any, network: Any,
                      session: Any = None) -> dict[str, str]:
    """Every `ss_*` key sd-scripts writes for this kind of run (plus the modelspec.* keys), as strings."""
    t = cfg.training
    num_processes = getattr(getattr(session, "accelerator", None), "num_processes", 1)
    batches = getattr(session, "batches_per_epoch", None) or sum(len(d.epoch_batches(0)) for d in datasets)
    max_steps = getattr(session, "total_steps", None) or t.max_train_steps
    steps_per_epoch = max(1, math.ceil(batches / t.gradient_accumulation_steps))
    num_train = sum(_image_counts(ds)[0] for ds in datasets)
    num_reg = sum(_image_counts(ds)[1] for ds in datasets)
    md: dict[str, Any] = {
        "ss_session_id": _SESSION_ID,
        "ss_training_started_at": _START,
        "ss_text_encoder_lr": _text_encoder_lr(cfg),
        "ss_num_train_images": num_train,
        "ss_num_validation_images": sum(len(ds.validation_indices) for ds in datasets),
        "ss_num_reg_images": num_reg,
        "ss_num_batches_per_epoch": batches,
        "ss_num_epochs": math.ceil(max_steps / steps_per_epoch),
        "ss_max_train_steps": max_steps,
        "ss_network_module": _network_module(cfg),
        "ss_base_model_version": BASE_MODEL_VERSIONS.get(cfg.family, cfg.family),
        "ss_sd_scripts_commit_hash": _implementation_version(),
        "ss_optimizer": _optimizer_label(cfg, session),
    }
    md.update({k: _arg(cfg, flag, default) for k, flag, default in _FLAG_KEYS})
    md.update({k: bool(_arg(cfg, flag, False)) for k, flag in _BOOL_FLAG_KEYS})
    md["ss_cache_latents"] = bool(cfg.cache.cache_latents or cfg.cache.cache_latents_to_disk)
    if cfg.family == "flux":
        md.update({k: _arg(cfg, flag, default) for k, flag, default in _FLUX_FLAG_KEYS})
    if cfg.network_kind == "lllite":
        md["ss_cond_emb_dim"] = cfg.network.cond_emb_dim
    if datasets:
        if _uses_dataset_toml(cfg):
            md.update(datasets_metadata(datasets))
        else:
            md.update(command_line_dataset_metadata(cfg, datasets, num_processes))
    if cfg.network.network_args:
        md["ss_network_args"] = json.dumps(_network_args(cfg))
    md.update(model_name_metadata("sd_model", cfg.model.pretrained_model_name_or_path))
    md.update(model_name_metadata("vae", getattr(cfg.model, "vae", None)))
    md.update({"ss_training_finished_at": time.time(), "ss_steps": state.global_step, "ss_epoch": state.epoch})
    out = {k: str(v) for k, v in md.items()}
    res = datasets[0].config.resolution if datasets else None
    out.update(modelspec_metadata(cfg, res))
    return out


def save_metadata(session: Any, state: Any) -> dict[str, str]:
    """What a network file saved now carries: everything, or with --no_metadata sd-scripts' minimum (the
    modelspec.* keys stay either way, as in sd-scripts)."""
    cfg = session.cfg
    if cfg.save.no_metadata:
        res = session.datasets[0].config.resolution if session.datasets else None
        return {**minimum_metadata(cfg), **modelspec_metadata(cfg, res)}
    return training_metadata(cfg, session.datasets, state, session.network, session=session)


def modelspec_metadata(cfg: RunConfig, resolution: tuple[int, int] | None = None) -> dict[str, str]:
    """The `modelspec.*` keys (sd-scripts writes them even with --no_metadata): --metadata_* flags, the title
    defaulting to --output_name, and the model facts (architecture, resolution, timestep range)."""
    from networks.kohya_metadata import MODELSPEC_USER_FIELDS, build_modelspec

    sv, t = cfg.save, cfg.training
    lo, hi = getattr(t, "min_timestep", 0), getattr(t, "max_timestep", 1000)
    timesteps = (lo, hi) if (lo, hi) != (0, 1000) and lo is not None and hi is not None else None
    res = resolution or (1024, 1024)
    return build_modelspec(
        family=cfg.family, title=sv.output_name, resolution=(res[0], res[1]),
        user_fields={name: getattr(sv, f"metadata_{name}", None) for name in MODELSPEC_USER_FIELDS},
        v_parameterization=bool(getattr(cfg.model, "v_parameterization", False)), timesteps=timesteps,
        clip_skip=getattr(t, "clip_skip", None), implementation_version=_implementation_version(),
        timestamp=_START)
