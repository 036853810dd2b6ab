"""Read an sd-scripts dataset TOML into a validated DatasetGroupConfig.

The format is kohya-ss/sd-scripts' `--dataset_config`: `[general]`, `[[datasets]]`, `[[datasets.subsets]]`. Values are
inherited general -> dataset -> subset, so a subset-level key (e.g. `num_repeats`) may sit in any of the three tables
and a dataset-level key (e.g. `resolution`) in `[general]` or `[[datasets]]`. Users' existing configs must load
unchanged, so sd-scripts keys that this toolkit does not use are accepted and ignored; a key nobody knows is a typo
and is reported with the closest valid key, because silently ignoring `num_repeat = 10` costs a whole training run.
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from library.config.dataset_source import DatasetSource
from library.config.toml_read import read_toml
from library.data.types import DatasetConfig, DatasetGroupConfig, DatasetKind, SubsetConfig
from library.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeySpec:
    """How one config key is checked: its kind, an optional range check, and which level owns it."""

    kind: str  # "str" | "path" | "bool" | "int" | "float" | "resolution"
    level: str  # "subset" | "dataset"
    check: Callable[[Any], str | None] | None = None  # returns a problem description, or None when fine


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}, got {v}"


def _fraction(upper_inclusive: bool = True) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = 0 <= v <= 1 if upper_inclusive else 0 <= v < 1
        return None if ok else f"must be between 0 and 1{'' if upper_inclusive else ' (exclusive)'}, got {v}"

    return check


def _non_empty(v: str) -> str | None:
    return None if v else "must not be empty"


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


# sd-scripts' --resize_interpolation choices (plus "box", which its dataset code also maps)
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


# Keys resolved per subset (and inheritable from [[datasets]] and [general]).
SUBSET_KEYS: dict[str, KeySpec] = {
    "image_dir": KeySpec("path", "subset"),
    "metadata_file": KeySpec("path", "subset"),
    "conditioning_data_dir": KeySpec("path", "subset"),
    "caption_extension": KeySpec("str", "subset"),
    "class_tokens": KeySpec("str", "subset"),
    "is_reg": KeySpec("bool", "subset"),
    "num_repeats": KeySpec("int", "subset", _at_least(1)),
    "keep_tokens": KeySpec("int", "subset", _at_least(0)),
    "keep_tokens_separator": KeySpec("str", "subset"),
    "caption_separator": KeySpec("str", "subset", _non_empty),
    "shuffle_caption": KeySpec("bool", "subset"),
    "caption_prefix": KeySpec("str", "subset"),
    "caption_suffix": KeySpec("str", "subset"),
    "caption_dropout_rate": KeySpec("float", "subset", _fraction()),
    "caption_dropout_every_n_epochs": KeySpec("int", "subset", _at_least(0)),
    "caption_tag_dropout_rate": KeySpec("float", "subset", _fraction()),
    "flip_aug": KeySpec("bool", "subset"),
    "color_aug": KeySpec("bool", "subset"),
    "random_crop": KeySpec("bool", "subset"),
    "alpha_mask": KeySpec("bool", "subset"),
    "cache_info": KeySpec("bool", "subset"),
    "validation_split": KeySpec("float", "subset", _fraction(upper_inclusive=False)),
    "validation_seed": KeySpec("int", "subset"),
    "secondary_separator": KeySpec("str", "subset"),
    "enable_wildcard": KeySpec("bool", "subset"),
    "token_warmup_min": KeySpec("int", "subset", _at_least(0)),
    "token_warmup_step": KeySpec("float", "subset", _at_least(0)),
    "face_crop_aug_range": KeySpec("range", "subset"),
    "resize_interpolation": KeySpec("str", "subset", _one_of(RESIZE_INTERPOLATIONS)),
    "custom_attributes": KeySpec("table", "subset"),
}

# Keys resolved per dataset (inheritable from [general]).
DATASET_KEYS: dict[str, KeySpec] = {
    "resolution": KeySpec("resolution", "dataset"),
    "batch_size": KeySpec("int", "dataset", _at_least(1)),
    "enable_bucket": KeySpec("bool", "dataset"),
    "min_bucket_reso": KeySpec("int", "dataset", _at_least(1)),
    "max_bucket_reso": KeySpec("int", "dataset", _at_least(1)),
    "bucket_reso_steps": KeySpec("int", "dataset", _at_least(1)),
    "bucket_no_upscale": KeySpec("bool", "dataset"),
    "prior_loss_weight": KeySpec("float", "dataset"),  # loss weight of is_reg images (--prior_loss_weight)
    "network_multiplier": KeySpec("float", "dataset"),
}

# sd-scripts keys (and a few from popular forks) that this toolkit accepts without using them.
IGNORED_KEYS: frozenset[str] = frozenset(
    {
        "system_prompt",
        "debug_dataset",
        "max_token_length",
    }
)

KIND_DESCRIPTIONS: dict[str, str] = {
    "str": "a string",
    "path": "a path string",
    "bool": "a boolean (true or false)",
    "int": "an integer",
    "float": "a number",
    "resolution": "an integer or [width, height]",
    "range": "two numbers [low, high]",
    "table": "a table of values",
}

# sd-scripts' dataclass defaults, used when no table sets a key.
SUBSET_DEFAULTS = SubsetConfig(table="")
DATASET_DEFAULTS: dict[str, Any] = {
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "prior_loss_weight": 1.0,
    "network_multiplier": 1.0,
}

# The VAE shrinks images 8x, so bucket edges must stay on the latent grid.
LATENT_GRID = 8


def load_dataset_config(source: str | os.PathLike | DatasetSource,
                        defaults: Mapping[str, Any] | None = None) -> DatasetGroupConfig:
    """Parse, validate and resolve a dataset TOML, or the table built from the dataset flags.

    `defaults` (and a DatasetSource's `fallbacks`) play the role of sd-scripts' command-line fallbacks (e.g.
    `{"resolution": 1024}` from `--resolution`): the lowest-priority table, below `[general]`.
    """
    if isinstance(source, DatasetSource):
        fallback = {**source.fallbacks, **(defaults or {})}
        if source.toml_path is None:
            return _load(source.table or {}, str(source), os.getcwd(), fallback)
        source = source.toml_path
    else:
        fallback = dict(defaults or {})
    path = os.fspath(source)
    return _load(read_toml(path, "dataset config file"), path, os.path.dirname(os.path.abspath(path)), fallback)


def _load(raw: Mapping[str, Any], source: str, base_dir: str, fallback: dict[str, Any]) -> DatasetGroupConfig:
    ctx = _Context(source, base_dir)
    for key in raw:
        if key not in ("general", "datasets"):
            raise ConfigError(
                f"unknown top-level key{_suggest(key, ['general', 'datasets'])}",
                file=source,
                table="top level",
                key=key,
            )
    general = raw.get("general", {})
    if not isinstance(general, dict):
        raise ConfigError("must be a table ([general])", file=source, table="general")
    ctx.check_table(fallback, "command line", allow_dataset=True)
    ctx.check_table(general, "general", allow_dataset=True)

    datasets_raw = raw.get("datasets", [])
    if not isinstance(datasets_raw, list) or not all(isinstance(d, dict) for d in datasets_raw):
        raise ConfigError("must be an array of tables ([[datasets]])", file=source, table="datasets")
    if not datasets_raw:
        raise ConfigError("the config defines no [[datasets]] table", file=source, table="datasets")
    datasets = [ctx.resolve_dataset(d, i, general, fallback) for i, d in enumerate(datasets_raw)]
    return DatasetGroupConfig(source=source, datasets=datasets)


def _suggest(key: str, valid: list[str] | set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class _Context:
    """Validation state for one file: its name (for messages) and its folder (for relative paths)."""

    def __init__(self, source: str, base_dir: str):
        self.source = source
        self.base_dir = base_dir

    def error(self, message: str, table: str, key: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.source, table=table, key=key)

    # ---- key and type checks -------------------------------------------------------------------------------

    def check_table(
        self, table: Mapping[str, Any], name: str, allow_dataset: bool, allow_subsets: bool = False
    ) -> None:
        """Reject unknown keys (with a suggestion), keys at the wrong level, and values of the wrong type."""
        valid = set(SUBSET_KEYS) | (set(DATASET_KEYS) if allow_dataset else set()) | set(IGNORED_KEYS)
        if allow_subsets:
            valid.add("subsets")
        for key, value in table.items():
            if key in IGNORED_KEYS or key == "subsets" and allow_subsets:
                continue
            if key in DATASET_KEYS and not allow_dataset:
                raise self.error(
                    "is a dataset-level key and cannot be set per subset; move it to [[datasets]] or [general]",
                    name,
                    key,
                )
            spec = SUBSET_KEYS.get(key) or DATASET_KEYS.get(key)
            if spec is None:
                raise self.error(f"unknown key{_suggest(key, valid | set(DATASET_KEYS))}", name, key)
            self.check_value(key, value, spec, name)

    def check_value(self, key: str, value: Any, spec: KeySpec, table: str) -> None:
        ok = {
            "str": lambda v: isinstance(v, str),
            "path": lambda v: isinstance(v, str) and v != "",
            "bool": lambda v: isinstance(v, bool),
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "resolution": _is_resolution,
            "range": lambda v: isinstance(v, list) and len(v) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
            "table": lambda v: isinstance(v, dict),
        }[spec.kind](value)
        if not ok:
            raise self.error(f"expected {KIND_DESCRIPTIONS[spec.kind]}, got {value!r}", table, key)
        if spec.check is not None:
            problem = spec.check(value)
            if problem:
                raise self.error(problem, table, key)

    # ---- resolution of one dataset ---------------------------------------------------------------------------

    def resolve_dataset(
        self, raw: dict[str, Any], index: int, general: Mapping[str, Any], fallback: Mapping[str, Any]
    ) -> DatasetConfig:
        table = f"datasets[{index}]"
        self.check_table(raw, table, allow_dataset=True, allow_subsets=True)
        subsets_raw = raw.get("subsets", [])
        if not isinstance(subsets_raw, list) or not all(isinstance(s, dict) for s in subsets_raw):
            raise self.error("must be an array of tables ([[datasets.subsets]])", table, "subsets")
        if not subsets_raw:
            raise self.error("has no [[datasets.subsets]] table; each dataset needs at least one subset", table)

        chain = [raw, general, fallback]  # highest priority first
        subsets = []
        for j, sub in enumerate(subsets_raw):
            sub_table = f"{table}.subsets[{j}]"
            self.check_table(sub, sub_table, allow_dataset=False)
            subsets.append(self.resolve_subset(sub, sub_table, chain))

        kind = self.choose_kind(subsets, table)
        for subset in subsets:
            self.check_paths(subset, kind)

        values = {k: _lookup(k, chain, DATASET_DEFAULTS.get(k)) for k in DATASET_KEYS}
        resolution = values["resolution"]
        if resolution is None:
            raise self.error("resolution is not set; set it in [[datasets]] or [general], or give --resolution", table, "resolution")
        resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        dataset = DatasetConfig(
            table=table,
            kind=kind,
            resolution=resolution,
            batch_size=values["batch_size"],
            enable_bucket=values["enable_bucket"],
            min_bucket_reso=values["min_bucket_reso"],
            max_bucket_reso=values["max_bucket_reso"],
            bucket_reso_steps=values["bucket_reso_steps"],
            bucket_no_upscale=values["bucket_no_upscale"],
            prior_loss_weight=float(values["prior_loss_weight"]),
            network_multiplier=float(values["network_multiplier"]),
            subsets=subsets,
        )
        self.check_buckets(dataset, chain)
        return dataset

    def resolve_subset(self, raw: dict[str, Any], table: str, parents: list[Mapping[str, Any]]) -> SubsetConfig:
        chain = [raw, *parents]
        values = {k: _lookup(k, chain, getattr(SUBSET_DEFAULTS, k)) for k in SUBSET_KEYS}
        ext = values["caption_extension"]
        if ext and not ext.startswith("."):
            values["caption_extension"] = "." + ext  # "txt" means ".txt"; sd-scripts would look for "imgtxt"
        if isinstance(values["caption_dropout_rate"], int):
            values["caption_dropout_rate"] = float(values["caption_dropout_rate"])
        if isinstance(values["caption_tag_dropout_rate"], int):
            values["caption_tag_dropout_rate"] = float(values["caption_tag_dropout_rate"])
        for key in ("validation_split", "token_warmup_step"):
            if isinstance(values[key], int):
                values[key] = float(values[key])
        if values["face_crop_aug_range"] is not None:
            values["face_crop_aug_range"] = [float(v) for v in values["face_crop_aug_range"]]
        return SubsetConfig(table=table, **values)

    def choose_kind(self, subsets: list[SubsetConfig], table: str) -> DatasetKind:
        """sd-scripts' rule: all subsets with conditioning_data_dir -> controlnet; all with metadata_file ->
        finetuning; none with either -> dreambooth. A mixture cannot be one dataset (different loaders)."""
        rules = (("conditioning_data_dir", "controlnet", "ControlNet subsets", "other subsets"),
                 ("metadata_file", "finetuning", "fine-tuning subsets", "DreamBooth subsets"))
        for key, kind, these, others in rules:
            having = [s for s in subsets if getattr(s, key)]
            if having:
                if len(having) != len(subsets):
                    odd = next(s for s in subsets if not getattr(s, key))
                    raise self.error(f"mixes {these} (with {key}) and {others} ({odd.table} has none); split them "
                                     "into separate [[datasets]]", table, key)
                return kind
        return "dreambooth"

    def check_paths(self, subset: SubsetConfig, kind: DatasetKind) -> None:
        """Resolve every path (cwd first, as sd-scripts does, then the TOML's folder) and require it to exist."""
        if subset.image_dir is None and kind != "finetuning":
            raise self.error("image_dir is required for a DreamBooth or ControlNet subset", subset.table, "image_dir")
        if subset.image_dir is not None:
            subset.image_dir = self.resolve_path(subset.image_dir, subset.table, "image_dir", want_dir=True)
        if subset.metadata_file is not None:
            subset.metadata_file = self.resolve_path(
                subset.metadata_file, subset.table, "metadata_file", want_dir=False
            )
        if subset.conditioning_data_dir is not None:
            subset.conditioning_data_dir = self.resolve_path(
                subset.conditioning_data_dir, subset.table, "conditioning_data_dir", want_dir=True
            )

    def resolve_path(self, value: str, table: str, key: str, want_dir: bool) -> str:
        expanded = os.path.expanduser(value)
        candidates = [expanded] if os.path.isabs(expanded) else [expanded, os.path.join(self.base_dir, expanded)]
        exists = os.path.isdir if want_dir else os.path.isfile
        for cand in candidates:
            if exists(cand):
                return os.path.abspath(cand)
        what = "directory" if want_dir else "file"
        tried = " or ".join(dict.fromkeys(os.path.abspath(c) for c in candidates))
        raise self.error(f"{what} not found: {value} (looked for {tried})", table, key)

    def check_buckets(self, d: DatasetConfig, chain: list[Mapping[str, Any]]) -> None:
        """sd-scripts' bucket sanity rules, as errors at load time instead of asserts mid-run."""
        w, h = d.resolution
        if w <= 0 or h <= 0:
            raise self.error(f"must be positive, got {d.resolution}", d.table, "resolution")
        if not d.enable_bucket:
            return
        step = d.bucket_reso_steps
        if step % LATENT_GRID:
            raise self.error(
                f"must be a multiple of {LATENT_GRID} (the VAE's downscale factor), got {step}",
                d.table,
                "bucket_reso_steps",
            )
        if d.min_bucket_reso > d.max_bucket_reso:
            raise self.error(
                f"min_bucket_reso ({d.min_bucket_reso}) is larger than max_bucket_reso ({d.max_bucket_reso})",
                d.table,
                "min_bucket_reso",
            )
        # sd-scripts rounds min down and max up to the step (with a warning) instead of failing: keep its shapes.
        if d.min_bucket_reso % step:
            adjusted = d.min_bucket_reso - d.min_bucket_reso % step
            logger.warning(
                "%s: min_bucket_reso %d is not a multiple of %d; using %d", d.table, d.min_bucket_reso, step, adjusted
            )
            d.min_bucket_reso = adjusted
        if d.max_bucket_reso % step:
            adjusted = d.max_bucket_reso + step - d.max_bucket_reso % step
            logger.warning(
                "%s: max_bucket_reso %d is not a multiple of %d; using %d", d.table, d.max_bucket_reso, step, adjusted
            )
            d.max_bucket_reso = adjusted
        if d.min_bucket_reso <= 0:
            raise self.error(f"becomes 0 when rounded down to bucket_reso_steps ({step})", d.table, "min_bucket_reso")
        if d.bucket_no_upscale:
            return  # sd-scripts ignores min/max bucket reso in this mode: buckets come from image sizes
        if min(w, h) < d.min_bucket_reso:
            raise self.error(
                f"min_bucket_reso ({d.min_bucket_reso}) must be <= the smaller side of resolution {d.resolution}",
                d.table,
                "min_bucket_reso",
            )
        if max(w, h) > d.max_bucket_reso:
            raise self.error(
                f"max_bucket_reso ({d.max_bucket_reso}) must be >= the larger side of resolution {d.resolution}",
                d.table,
                "max_bucket_reso",
            )


def _is_resolution(value: Any) -> bool:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value):
        return True
    return isinstance(value, list) and len(value) == 2 and all(is_int(v) for v in value)


def _lookup(key: str, chain: list[Mapping[str, Any]], default: Any) -> Any:
    for table in chain:
        if key in table and table[key] is not None:
            return table[key]
    return default
