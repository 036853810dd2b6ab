"""Plain data passed between the dataset-config resolver, the dataset, the caches and the training loop.

The flow is one way: TOML -> DatasetGroupConfig (library.config.dataset_schema) -> ImageRecord lists
(library.data.sources) -> TrainDataset items and batches (library.data.dataset) -> caches -> loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DatasetKind = Literal["dreambooth", "finetuning", "controlnet"]


@dataclass
class SubsetConfig:
    """One [[datasets.subsets]] table after general -> dataset -> subset inheritance."""

    table: str  # e.g. "datasets[0].subsets[1]", used in error messages
    image_dir: str | None = None
    metadata_file: str | None = None
    conditioning_data_dir: str | None = None
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    is_reg: bool = False
    num_repeats: int = 1
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    shuffle_caption: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    cache_info: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    secondary_separator: str | None = None  # joins tags that shuffle/drop as one; becomes caption_separator after
    enable_wildcard: bool = False  # `{a|b}` choices and one random line of multi-line captions
    token_warmup_min: int = 1  # free tags shown at step 0 of a token warm-up
    token_warmup_step: float = 0.0  # steps of the warm-up (below 1: a fraction of the run's steps)
    face_crop_aug_range: list[float] | None = None  # accepted; face crops need face boxes in the file names
    resize_interpolation: str | None = None  # None: area when shrinking, Lanczos when enlarging
    custom_attributes: dict | None = None  # free-form per-subset data kept for custom code


@dataclass
class DatasetConfig:
    """One [[datasets]] table, resolved."""

    table: str  # e.g. "datasets[0]"
    kind: DatasetKind
    resolution: tuple[int, int]  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0  # loss weight of regularization (is_reg) images
    network_multiplier: float = 1.0  # the network's strength while training on this dataset
    subsets: list[SubsetConfig] = field(default_factory=list)


@dataclass
class DatasetGroupConfig:
    source: str  # the TOML file path (for messages)
    datasets: list[DatasetConfig] = field(default_factory=list)


@dataclass
class ImageRecord:
    """One training image as found on disk, before bucketing. `caption` is the raw caption from its source
    (caption file, metadata, captions.txt, or the class_tokens fallback), before prefix/suffix/shuffle/dropout."""

    path: str
    caption: str
    subset_index: int
    is_reg: bool = False
    conditioning_path: str | None = None
    split: Literal["train", "validation"] = "train"
