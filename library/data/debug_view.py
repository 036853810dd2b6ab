"""sd-scripts' --debug_dataset (show what training would see, then stop) and the one-line notices for dataset
options that are accepted but cannot act here.

sd-scripts opens a window per image; a text summary per sample serves the same purpose (checking captions, repeats
and buckets before spending a run) and also works over SSH.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

logger = logging.getLogger(__name__)

DEBUG_SAMPLES_PER_DATASET = 20  # enough to see the caption operations at work without flooding the console


def warn_unsupported(datasets: Sequence[Any], dataset_class: str | None, skip_cache_check: bool = False) -> None:
    """One warning per option that is accepted for compatibility but changes nothing here."""
    if skip_cache_check:
        logger.warning("--skip_cache_check: cache files are still checked against their images (a stale latent "
                       "would train silently on the wrong picture); it hashes each image and reads each cache file's header, without "
                       "decoding latents")
    if dataset_class:
        logger.warning("--dataset_class %s: custom dataset classes are not supported; the dataset comes from "
                       "--dataset_config / --train_data_dir instead", dataset_class)
    face = sorted({s.table for d in datasets for s in d.config.subsets if s.face_crop_aug_range})
    if face:
        logger.warning("face_crop_aug_range (%s): face boxes in file names are not read, so these images are "
                       "cropped as usual", ", ".join(face))


def describe_datasets(datasets: Sequence[Any], epoch: int = 0) -> str:
    """Per dataset: its bucket histogram, then the first samples of `epoch` with bucket, repeats and the caption
    after the caption operations (prefix, shuffle, dropout, wildcards, ...)."""
    lines = []
    for ds in datasets:
        lines.append(ds.format_bucket_histogram())
        shown = 0
        for batch in ds.epoch_batches(epoch):
            for index in batch:
                if shown >= DEBUG_SAMPLES_PER_DATASET:
                    break
                item = ds.items[index]
                w, h = item.bucket
                lines.append(f"  {item.record.path}  bucket {w}x{h}  repeats {item.num_repeats}"
                             f"{'  (reg)' if item.record.is_reg else ''}  caption: {ds._caption(index, epoch)!r}")
                shown += 1
    return "\n".join(lines)
