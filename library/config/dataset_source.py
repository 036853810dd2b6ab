"""Where a run's datasets come from: a dataset TOML, or the sd-scripts dataset flags (no TOML at all).

Both end as the same TOML-shaped table that library.config.dataset_schema validates and resolves, so the rest of the
pipeline cannot tell them apart. The folder rules follow sd-scripts:
- `--train_data_dir D`: every sub-folder named `<repeats>_<class tokens>` (e.g. `10_sks dog`) is a DreamBooth subset
  with that many repeats and those class tokens (the caption of images without a caption file); sub-folders without
  a number prefix are skipped with a warning. `--reg_data_dir` works the same and marks its subsets `is_reg`.
- `--in_json M`: one fine-tuning subset (captions from the metadata file), images under `--train_data_dir`.
- `--conditioning_data_dir C` (ControlNet-LLLite): one subset of `--train_data_dir`'s images and their conditioning
  images in C.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from library.config.flags import flag_fields
from library.errors import ConfigError

logger = logging.getLogger(__name__)

COMMAND_LINE = "command line"


@dataclass
class DatasetSource:
    """A dataset TOML path or a table built from flags, plus the flags' values for keys the tables leave unset."""

    toml_path: str | None = None
    table: dict[str, Any] | None = None  # TOML-shaped ({"datasets": [...]}) when built from flags
    fallbacks: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __str__(self) -> str:
        return self.toml_path or self.label or COMMAND_LINE

    def __fspath__(self) -> str:  # code written for a TOML path keeps working for TOML sources
        if self.toml_path is None:
            raise TypeError(f"{self}: the datasets come from command-line flags, not from a file")
        return self.toml_path


def dataset_fallbacks(values: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset-TOML keys the dataset flags give values for (None values are left out: unset)."""
    from library.config.dataset_flags import DatasetFlags

    out: dict[str, Any] = {}
    for ff in flag_fields(DatasetFlags):
        key = ff.spec.dataset_key
        if key is None or key in ("conditioning_data_dir",):
            continue
        value = values.get(ff.name)
        if ff.name == "caption_extension" and values.get("caption_extention") and value == ff.spec.default:
            value = values["caption_extention"]  # the old spelling counts where the new one is unset
        if ff.name == "resolution":
            value = parse_resolution(value)
        if ff.name == "face_crop_aug_range":
            value = parse_range(value, "--face_crop_aug_range")
        if value is not None:
            out[key] = value
    if values.get("prior_loss_weight") is not None:  # a training flag that is also a dataset key in sd-scripts
        out["prior_loss_weight"] = values["prior_loss_weight"]
    return out


def parse_resolution(value: Any) -> Any:
    """'W,H' or 'W' (sd-scripts' --resolution) as the dataset TOML's int or [w, h]."""
    if value is None or isinstance(value, (int, list)):
        return value
    parts = [p.strip() for p in str(value).split(",")]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--resolution {value!r}: expected 'W,H' or one number, e.g. 1024,1024") from None
    if len(numbers) == 1:
        return numbers[0]
    if len(numbers) != 2:
        raise ConfigError(f"--resolution {value!r}: expected 'W,H' or one number, e.g. 1024,1024")
    return numbers


def parse_range(value: Any, name: str) -> Any:
    """'low,high' (sd-scripts' string form of a range flag) as the dataset TOML's [low, high]."""
    if value is None or isinstance(value, list):
        return value
    try:
        numbers = [float(p) for p in str(value).split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 2:
        raise ConfigError(f"{name} {value!r}: expected 'low,high', e.g. 2.0,4.0")
    return numbers


def dataset_source_from_flags(values: Mapping[str, Any]) -> DatasetSource:
    """The run's dataset source from the parsed dataset flags (a dataset TOML wins over the folder flags)."""
    fallbacks = dataset_fallbacks(values)
    toml_path = values.get("dataset_config")
    if toml_path:
        ignored = [f"--{k}" for k in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
                   if values.get(k)]
        if ignored:
            logger.warning("%s: --dataset_config is given, so %s %s ignored (the TOML lists the folders)",
                           toml_path, ", ".join(ignored), "is" if len(ignored) == 1 else "are")
        return DatasetSource(toml_path=str(toml_path), fallbacks=fallbacks)
    train_dir = values.get("train_data_dir")
    if not train_dir:
        raise ConfigError("no dataset: give --dataset_config (a dataset TOML) or --train_data_dir (a folder of "
                          "'<repeats>_<class tokens>' sub-folders, e.g. '10_sks dog')")
    if values.get("in_json"):
        subsets = [{"image_dir": str(train_dir), "metadata_file": str(values["in_json"])}]
        label = f"{COMMAND_LINE} (--in_json {values['in_json']})"
    elif values.get("conditioning_data_dir"):
        subsets = [{"image_dir": str(train_dir), "conditioning_data_dir": str(values["conditioning_data_dir"])}]
        label = f"{COMMAND_LINE} (--train_data_dir {train_dir} --conditioning_data_dir)"
    else:
        subsets = folder_subsets(str(train_dir), "--train_data_dir", is_reg=False)
        if not subsets:
            raise ConfigError(f"--train_data_dir {train_dir}: no '<repeats>_<class tokens>' sub-folder (e.g. "
                              "'10_sks dog' with the images inside); images directly in the folder are not used")
        if values.get("reg_data_dir"):
            subsets += folder_subsets(str(values["reg_data_dir"]), "--reg_data_dir", is_reg=True)
        label = f"{COMMAND_LINE} (--train_data_dir {train_dir})"
    if values.get("reg_data_dir") and (values.get("in_json") or values.get("conditioning_data_dir")):
        logger.warning("--reg_data_dir is used with DreamBooth folders only; ignored with --in_json or "
                       "--conditioning_data_dir")
    return DatasetSource(table={"datasets": [{"subsets": subsets}]}, fallbacks=fallbacks, label=label)


def folder_subsets(root: str, flag_name: str, is_reg: bool) -> list[dict[str, Any]]:
    """One subset per '<repeats>_<class tokens>' sub-folder of `root`, in name order."""
    if not os.path.isdir(root):
        raise ConfigError(f"{flag_name} {root}: folder not found")
    subsets = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        repeats, _, tokens = name.partition("_")
        try:
            num_repeats = int(repeats)
        except ValueError:
            logger.warning("%s: sub-folder '%s' skipped: its name does not start with '<repeats>_' (e.g. '10_%s')",
                           flag_name, name, name)
            continue
        if num_repeats < 1:
            logger.warning("%s: sub-folder '%s' skipped: %d repeats", flag_name, name, num_repeats)
            continue
        subsets.append({"image_dir": os.path.abspath(path), "num_repeats": num_repeats, "is_reg": is_reg,
                        "class_tokens": tokens})
    return subsets
