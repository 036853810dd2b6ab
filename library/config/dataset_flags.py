"""Dataset flags: a dataset from the command line (sd-scripts' folder convention), and defaults for a dataset TOML.

Flags with a `dataset_key` give a value for that dataset-TOML key: with `--train_data_dir` they fill every subset and
dataset built from the folders; with `--dataset_config` they are the lowest-priority table, below `[general]` (so
`--train_batch_size 4` is the batch size of every dataset that does not set its own), as in sd-scripts.
"""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import Path, flag


@dataclass
class DatasetFlags:
    """dataset (a dataset TOML, or a dataset from these flags)"""

    dataset_config: str | None = flag(None, "dataset TOML ([general] / [[datasets]] / [[datasets.subsets]])",
                                      type=Path)
    train_data_dir: str | None = flag(None, "folder of '<repeats>_<class tokens>' sub-folders (e.g. '10_sks dog'), "
                                            "or of the images of --in_json")
    reg_data_dir: str | None = flag(None, "folder of '<repeats>_<class tokens>' sub-folders of regularization "
                                          "images")
    in_json: str | None = flag(None, "fine-tuning metadata JSON (captions / tags per image of --train_data_dir)")
    conditioning_data_dir: str | None = flag(None, "ControlNet-LLLite: folder of conditioning images named as the "
                                                   "images of --train_data_dir", dataset_key="conditioning_data_dir")
    dataset_repeats: int = flag(1, "repeats of the --in_json images per epoch", dataset_key="num_repeats")
    resolution: str | None = flag(None, "training resolution: 'W,H' or one number for a square",
                                  dataset_key="resolution")
    train_batch_size: int = flag(1, "batch size (also of every dataset of a dataset TOML that sets none)",
                                 dataset_key="batch_size")
    enable_bucket: bool = flag(False, "aspect-ratio bucketing", dataset_key="enable_bucket")
    min_bucket_reso: int = flag(256, "smallest bucket side", dataset_key="min_bucket_reso")
    max_bucket_reso: int = flag(1024, "largest bucket side", dataset_key="max_bucket_reso")
    bucket_reso_steps: int = flag(64, "bucket sides are multiples of this", dataset_key="bucket_reso_steps")
    bucket_no_upscale: bool = flag(False, "buckets from the image sizes, never upscaling an image",
                                   dataset_key="bucket_no_upscale")
    caption_extension: str = flag(".caption", "extension of the caption files", dataset_key="caption_extension")
    caption_extention: str | None = flag(None, "old misspelling of --caption_extension (used when that one is unset)")
    shuffle_caption: bool = flag(False, "shuffle the comma-separated tags of each caption every time",
                                 dataset_key="shuffle_caption")
    keep_tokens: int = flag(0, "keep this many leading tags in place when shuffling or dropping",
                            dataset_key="keep_tokens")
    keep_tokens_separator: str = flag("", "tags before this separator are kept in place",
                                      dataset_key="keep_tokens_separator")
    caption_separator: str = flag(",", "separator of the tags in a caption", dataset_key="caption_separator")
    caption_prefix: str | None = flag(None, "text put before every caption", dataset_key="caption_prefix")
    caption_suffix: str | None = flag(None, "text put after every caption", dataset_key="caption_suffix")
    caption_dropout_rate: float = flag(0.0, "probability of training an image with an empty caption",
                                       dataset_key="caption_dropout_rate")
    caption_dropout_every_n_epochs: int = flag(0, "train with empty captions every N epochs",
                                               dataset_key="caption_dropout_every_n_epochs")
    caption_tag_dropout_rate: float = flag(0.0, "probability of dropping each tag of a caption",
                                           dataset_key="caption_tag_dropout_rate")
    color_aug: bool = flag(False, "random hue changes (not with --cache_latents)", dataset_key="color_aug")
    flip_aug: bool = flag(False, "random horizontal flips", dataset_key="flip_aug")
    random_crop: bool = flag(False, "random instead of centred crops", dataset_key="random_crop")
    alpha_mask: bool = flag(False, "use the images' alpha channel as the loss mask", dataset_key="alpha_mask")
    cache_info: bool = flag(False, "cache image sizes in a metadata file of each folder", dataset_key="cache_info")
    validation_split: float = flag(0.0, "fraction of the images held out for validation",
                                   dataset_key="validation_split")
    validation_seed: int | None = flag(None, "seed of the held-out split",
                                       dataset_key="validation_seed")
    secondary_separator: str | None = flag(None, "a second tag separator: tags joined by it are shuffled and "
                                                 "dropped as one, then it becomes --caption_separator",
                                           dataset_key="secondary_separator")
    enable_wildcard: bool = flag(False, "'{a|b|c}' in captions picks one choice each time; a multi-line caption "
                                        "uses one random line", dataset_key="enable_wildcard")
    token_warmup_min: int = flag(1, "free tags shown at the start of a token warm-up",
                                 dataset_key="token_warmup_min")
    token_warmup_step: float = flag(0.0, "steps until all tags are shown (below 1: a fraction of the run's "
                                         "steps; 0: no warm-up)", dataset_key="token_warmup_step")
    face_crop_aug_range: str | None = flag(None, "'low,high' face-crop zoom range (accepted; face boxes are not "
                                                 "read, so images are cropped as usual, with a warning)",
                                           dataset_key="face_crop_aug_range")
    resize_interpolation: str | None = flag(None, "image resize filter (default: area when shrinking, Lanczos "
                                                  "when enlarging)",
                                            choices=("lanczos", "nearest", "bilinear", "linear", "bicubic",
                                                     "cubic", "area"),
                                            dataset_key="resize_interpolation")
    debug_dataset: bool = flag(False, "print each dataset's images, buckets and captions as training would see "
                                      "them, then exit without training")
    dataset_class: str | None = flag(None, "'module.Class' of a custom dataset (not supported: a warning, and "
                                           "the dataset flags or TOML are used)")
    skip_cache_check: bool = flag(False, "do not re-check the contents of existing latent / text-encoder cache "
                                         "files (accepted; the checks read only file headers)")
    max_data_loader_n_workers: int = flag(8, "data-loader worker processes (accepted; images load in the main "
                                             "process)")
    persistent_data_loader_workers: bool = flag(False, "keep data-loader workers between epochs (accepted; images "
                                                       "load in the main process)")
