"""`ss_*` training metadata written into network files, as kohya's tools and UIs read it."""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from library.config.train_config import RunConfig
from library.train.optim import optimizer_name

_START = time.time()
# what sd-scripts writes as ss_base_model_version, per family
BASE_MODEL_VERSIONS = {"sdxl": "sdxl_base_v1-0", "flux": "flux1"}


def training_metadata(cfg: RunConfig, datasets: list[Any], state: Any, network: Any) -> dict[str, str]:
    n, o, t = cfg.network, cfg.optimizer, cfg.training
    buckets: Counter = Counter()
    num_images = 0
    for ds in datasets:
        num_images += len(ds.items)
        for (w, h), count in ds.bucket_histogram().items():
            buckets[f"{w}x{h}"] += count
    res = datasets[0].config.resolution if datasets else (0, 0)
    md: dict[str, Any] = {
        "ss_session_id": str(int(_START)),
        "ss_training_started_at": str(_START),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": cfg.save.output_name,
        "ss_network_module": n.network_module if cfg.network_kind == "lora" else "networks.control_net_lllite",
        "ss_network_dim": n.network_dim,
        "ss_network_alpha": n.network_alpha,
        "ss_network_dropout": n.network_dropout,
        "ss_network_args": json.dumps(dict(a.split("=", 1) for a in n.network_args if "=" in a)),
        "ss_base_model_version": BASE_MODEL_VERSIONS.get(cfg.family, cfg.family),
        "ss_v2": False,
        "ss_sd_model_name": cfg.model.pretrained_model_name_or_path,
        "ss_learning_rate": o.learning_rate,
        "ss_unet_lr": n.unet_lr,
        "ss_text_encoder_lr": n.text_encoder_lr,
        "ss_optimizer": optimizer_name(o) + (f"({','.join(o.optimizer_args)})" if o.optimizer_args else ""),
        "ss_lr_scheduler": o.lr_scheduler,
        "ss_lr_warmup_steps": o.lr_warmup_steps,
        "ss_max_train_steps": state.global_step,
        "ss_steps": state.global_step,
        "ss_epoch": state.epoch,
        "ss_seed": t.seed,
        "ss_mixed_precision": t.mixed_precision,
        "ss_full_fp16": t.full_fp16,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_gradient_accumulation_steps": t.gradient_accumulation_steps,
        "ss_noise_offset": t.noise_offset,
        "ss_min_snr_gamma": t.min_snr_gamma,
        "ss_num_train_images": num_images,
        "ss_resolution": f"({res[0]}, {res[1]})",
        "ss_bucket_info": json.dumps({"buckets": dict(buckets)}),
        "ss_cache_latents": cfg.cache.cache_latents or cfg.cache.cache_latents_to_disk,
        "ss_training_comment": n.training_comment,
    }
    if cfg.network_kind == "lllite":
        md["ss_cond_emb_dim"] = n.cond_emb_dim
    out = {k: str(v) for k, v in md.items() if v is not None}
    out.update(modelspec_metadata(cfg, res))
    return out


def _implementation_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"difftune/{version('difftune')}"
    except PackageNotFoundError:
        return "difftune/unknown"


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
