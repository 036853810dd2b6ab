"""What the run hands accelerate's init_trackers: project name, logged settings, per-tracker init arguments
(--log_tracker_name, --log_config, --log_tracker_config, --wandb_run_name, --wandb_api_key; sd-scripts' rules)."""
from __future__ import annotations

import dataclasses
from typing import Any

from library.config.train_config import RunConfig
from library.errors import ConfigError, UserError

# never sent to a tracker (wandb runs can be public): secrets, and local paths that name the user's folders
SECRET_FLAGS = ("wandb_api_key", "huggingface_token")
PATH_FLAGS = ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir", "conditioning_data_dir",
              "reg_data_dir", "output_dir", "logging_dir")


def logged_config(cfg: RunConfig) -> dict[str, Any] | None:
    """--log_config: every flag value as a tracker accepts it (scalars; lists and others as text), or None."""
    if not cfg.log.log_config:
        return None
    out: dict[str, Any] = {}
    for part in dataclasses.fields(cfg):
        group = getattr(cfg, part.name)
        if not dataclasses.is_dataclass(group):
            out[part.name] = group if isinstance(group, (bool, int, float, str)) or group is None else str(group)
            continue
        for f in dataclasses.fields(group):
            if f.name in SECRET_FLAGS or f.name in PATH_FLAGS:
                continue
            value = getattr(group, f.name)
            out[f.name] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return out


def tracker_init_kwargs(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Per-tracker init arguments: the --log_tracker_config TOML when given (it replaces --wandb_run_name, as in
    sd-scripts), else the wandb run name."""
    if cfg.log.log_tracker_config:
        import toml

        path = cfg.log.log_tracker_config
        try:
            with open(path, encoding="utf-8-sig") as fh:
                data = toml.load(fh)
        except OSError as e:
            raise UserError(f"--log_tracker_config {path}: cannot read it ({e.strerror})") from None
        except toml.TomlDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: {e.msg}; --log_tracker_config takes a TOML file with one "
                              "table per tracker, e.g. [wandb] then name = \"my-run\"") from None
        bad = [k for k, v in data.items() if not isinstance(v, dict)]
        if bad:
            raise ConfigError(f"{path}: {', '.join(bad)}: each key must be a table named after a tracker "
                              "([wandb], [tensorboard])")
        return data
    if cfg.log.wandb_run_name:
        return {"wandb": {"name": cfg.log.wandb_run_name}}
    return {}


def project_name(cfg: RunConfig) -> str:
    return cfg.log.log_tracker_name or cfg.log.log_prefix or "network_train"


def wandb_login(cfg: RunConfig, trackers: list[str]) -> None:
    """--wandb_api_key: log in before the tracker starts (only when wandb is among the trackers)."""
    if cfg.log.wandb_api_key and "wandb" in trackers:
        import wandb

        wandb.login(key=cfg.log.wandb_api_key)


def init_trackers(accelerator: Any, cfg: RunConfig) -> None:
    trackers = [str(getattr(t, "value", t)) for t in accelerator.log_with or []]
    wandb_login(cfg, trackers)
    accelerator.init_trackers(project_name(cfg), config=logged_config(cfg), init_kwargs=tracker_init_kwargs(cfg))
