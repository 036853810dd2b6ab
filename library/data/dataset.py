"""The training dataset: which images an epoch shows, grouped into single-bucket batches, and how a batch's pixels
(or cached latents) are produced.

Sampling (which item indices form which batch) and loading (decoding, resizing, augmenting) live in separate
functions: sampling is cheap and must be reproducible from (seed, epoch) alone, so that resume and multi-process
sharding agree on the order; loading is a pure function of (indices, epoch), so it can run in DataLoader workers.

Epoch semantics follow sd-scripts: each training image appears `num_repeats` times per epoch, and regularisation
images are cycled until they balance the training samples (see `balanced_repeats`).
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import torch

from library.data.buckets import BucketError, BucketSpec, assign_bucket
from library.data.captions import process_caption
from library.data.images import choose_crop, crop_at, image_size, load_image, resize_image
from library.data.types import DatasetConfig, ImageRecord, SubsetConfig
from library.errors import ConfigError

HUE_SHIFT_LIMIT = 8  # OpenCV hue units (0..179), i.e. +-16 degrees: small enough to keep skin tones plausible


class LatentSource(Protocol):
    """What the dataset needs from a latent cache (library.cache.latents.LatentCache implements it)."""

    def get(self, item_index: int, flipped: bool) -> torch.Tensor: ...

    def get_alpha_mask(self, item_index: int) -> torch.Tensor | None: ...


@dataclass
class DatasetItem:
    """One unique image of the dataset with its bucket; sizes are (width, height)."""

    record: ImageRecord
    subset: SubsetConfig
    original_size: tuple[int, int]
    bucket: tuple[int, int]
    resized_size: tuple[int, int]
    num_repeats: int  # samples per epoch (0 for validation items)


@dataclass
class Batch:
    """One batch from a single bucket. Sizes are (height, width) as SDXL's size conditioning expects them."""

    images: torch.Tensor | None  # [B,3,H,W] in [-1,1]; None when latents come from a cache
    captions: list[str]
    original_sizes: list[tuple[int, int]]
    crop_top_lefts: list[tuple[int, int]]
    target_sizes: list[tuple[int, int]]
    flipped: list[bool]
    conditioning_images: torch.Tensor | None  # [B,3,H,W] in [0,1]
    alpha_masks: torch.Tensor | None  # [B,H,W] in [0,1]
    item_indices: list[int]
    latents: torch.Tensor | None
    paths: list[str]
    # per-sample loss factors: prior_loss_weight for regularization images; None when all are 1
    loss_weights: torch.Tensor | None = None


@dataclass
class _Plan:
    """Per-item, per-epoch augmentation decisions, made before any pixel is read."""

    crop_top_left: tuple[int, int]  # in the resized image, before flipping
    flipped: bool
    hue_shift: float


def item_rng(seed: int, epoch: int, index: int, purpose: str) -> random.Random:
    """An rng per (seed, epoch, item, purpose): string seeds hash deterministically across processes, and separate
    purposes keep, e.g., captions unchanged when flip_aug is toggled."""
    return random.Random(f"{seed}/{epoch}/{index}/{purpose}")


def balanced_repeats(is_reg: list[bool], repeats: list[int]) -> list[int]:
    """Samples per epoch for each image. Training images keep their subset's repeats; regularisation images are
    registered in order with their own repeats, then cycled one extra repeat at a time, until they add up to at
    least the number of training samples (as sd-scripts does). Surplus reg images get 0 (unused)."""
    out = [0 if reg else r for reg, r in zip(is_reg, repeats)]
    num_train = sum(out)
    reg_indices = [i for i, reg in enumerate(is_reg) if reg]
    if not reg_indices or num_train == 0:
        return out
    total, first_pass = 0, True
    while total < num_train:
        for i in reg_indices:
            step = repeats[i] if first_pass else 1
            out[i] += step
            total += step
            if total >= num_train:
                break
        first_pass = False
    return out


def shift_hue(rgb: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of uint8 RGB pixels by `shift` OpenCV hue units."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.float32) + shift) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _to_tensor(rgb: np.ndarray, signed: bool) -> torch.Tensor:
    t = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255.0
    return t * 2.0 - 1.0 if signed else t


class TrainDataset:
    """Items, epoch sampling and batch loading for one [[datasets]] table."""

    def __init__(self, dataset: DatasetConfig, records: list[list[ImageRecord]], seed: int):
        if len(records) != len(dataset.subsets):
            raise ValueError(f"{dataset.table}: {len(records)} record lists for {len(dataset.subsets)} subsets")
        self.config = dataset
        self.seed = seed
        self.batch_size = dataset.batch_size
        self._latents: LatentSource | None = None
        self.items, self.train_indices, self.validation_indices = self._build_items(dataset, records)
        if not self.train_indices:
            raise ConfigError("no training images found in any subset", table=dataset.table)

    @staticmethod
    def _build_items(dataset: DatasetConfig, records: list[list[ImageRecord]]
                     ) -> tuple[list[DatasetItem], list[int], list[int]]:
        spec = BucketSpec.from_dataset(dataset)
        train = [(rec, sub) for sub, recs in zip(dataset.subsets, records) for rec in recs if rec.split == "train"]
        val = [(rec, sub) for sub, recs in zip(dataset.subsets, records) for rec in recs if rec.split != "train"]
        repeats = balanced_repeats([sub.is_reg for _, sub in train], [sub.num_repeats for _, sub in train])
        chosen = [(rec, sub, n) for (rec, sub), n in zip(train, repeats) if n > 0]
        chosen += [(rec, sub, 0) for rec, sub in val]
        items = []
        for rec, sub, n in chosen:
            size = image_size(rec.path)
            try:
                assignment = assign_bucket(spec, size)
            except BucketError as e:
                raise BucketError(f"{rec.path}: {e}") from None
            items.append(DatasetItem(rec, sub, size, tuple(assignment.bucket), tuple(assignment.resized_size), n))
        n_train = sum(1 for _, _, n in chosen if n > 0)
        return items, list(range(n_train)), list(range(n_train, len(items)))

    # ---- sampling -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Samples per epoch (repeats and reg balancing included)."""
        return sum(self.items[i].num_repeats for i in self.train_indices)

    @property
    def validation_items(self) -> list[DatasetItem]:
        return [self.items[i] for i in self.validation_indices]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Batches of item indices for `epoch`: shuffled within each bucket, cut to batch_size (a bucket's last
        batch may be smaller), then the batch order shuffled. Depends only on (seed, epoch)."""
        rng = random.Random(f"{self.seed}/epoch/{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in self.train_indices:
            by_bucket[self.items[i].bucket].extend([i] * self.items[i].num_repeats)
        batches = []
        for bucket in sorted(by_bucket):
            samples = by_bucket[bucket]
            rng.shuffle(samples)
            batches += [samples[k:k + self.batch_size] for k in range(0, len(samples), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def validation_batches(self) -> list[list[int]]:
        """Validation items grouped by bucket, in a fixed order."""
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in self.validation_indices:
            by_bucket[self.items[i].bucket].append(i)
        return [idx[k:k + self.batch_size] for b in sorted(by_bucket) for idx in [by_bucket[b]]
                for k in range(0, len(idx), self.batch_size)]

    def bucket_histogram(self) -> dict[tuple[int, int], int]:
        """Training samples per epoch per bucket (width, height)."""
        counts: Counter = Counter()
        for i in self.train_indices:
            counts[self.items[i].bucket] += self.items[i].num_repeats
        return dict(sorted(counts.items()))

    def format_bucket_histogram(self) -> str:
        lines = [f"{self.config.table}: {len(self)} samples per epoch, batch size {self.batch_size}"]
        lines += [f"  bucket {w}x{h}: {n}" for (w, h), n in self.bucket_histogram().items()]
        return "\n".join(lines)

    def fixed_captions(self) -> list[str]:
        """The distinct processed captions of all items, for text-encoder caching (valid only when no subset
        shuffles or drops captions, which the text cache checks)."""
        return list(dict.fromkeys(self._caption(i, 0) for i in range(len(self.items))))

    # ---- loading --------------------------------------------------------------------------------------------

    def attach_latent_cache(self, cache: LatentSource | None) -> None:
        """From now on `load_batch` returns cached latents instead of pixels."""
        self._latents = cache

    def set_progress(self, step: int | None, max_train_steps: int | None) -> None:
        """The training step the next batches are for (token warm-up shows fewer tags in early steps)."""
        self.current_step, self.max_train_steps = step, max_train_steps

    def _caption(self, index: int, epoch: int) -> str:
        item = self.items[index]
        return process_caption(item.record.caption, item.subset, item_rng(self.seed, epoch, index, "caption"), epoch,
                               getattr(self, "current_step", None), getattr(self, "max_train_steps", None))

    def _plan(self, index: int, epoch: int, augment: bool) -> _Plan:
        item, sub = self.items[index], self.items[index].subset
        random_crop = augment and sub.random_crop
        crop_rng = item_rng(self.seed, epoch, index, "crop") if random_crop else None
        top_left = choose_crop(item.resized_size, item.bucket, "random" if random_crop else "center", crop_rng)
        flipped = augment and sub.flip_aug and item_rng(self.seed, epoch, index, "flip").random() < 0.5
        hue = 0.0
        if augment and sub.color_aug:
            hue = item_rng(self.seed, epoch, index, "color").uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
        return _Plan(top_left, flipped, hue)

    def _image_pixels(self, item: DatasetItem, plan: _Plan) -> tuple[np.ndarray, np.ndarray | None]:
        """The training image fitted to its bucket and augmented: uint8 RGB and an optional float alpha mask."""
        loaded = load_image(item.record.path, alpha_mask=item.subset.alpha_mask)
        how = item.subset.resize_interpolation
        rgb = crop_at(resize_image(loaded.rgb, item.resized_size, how), plan.crop_top_left, item.bucket)
        alpha = None
        if loaded.alpha is not None:
            alpha = crop_at(resize_image(loaded.alpha, item.resized_size, how), plan.crop_top_left, item.bucket)
        if plan.hue_shift:
            rgb = shift_hue(np.ascontiguousarray(rgb), plan.hue_shift)
        if plan.flipped:
            rgb = rgb[:, ::-1]
            alpha = alpha[:, ::-1] if alpha is not None else None
        return rgb, alpha

    def _conditioning_pixels(self, item: DatasetItem, plan: _Plan) -> np.ndarray:
        """The conditioning image brought to the training image's original size, then given the very same resize,
        crop and flip, so that image and control map stay pixel-aligned."""
        rgb = resize_image(load_image(item.record.conditioning_path).rgb, item.original_size)
        rgb = crop_at(resize_image(rgb, item.resized_size), plan.crop_top_left, item.bucket)
        return rgb[:, ::-1] if plan.flipped else rgb

    def load_item_pixels(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Un-augmented (centre crop, no flip) image in [-1,1] [3,H,W] and alpha mask [H,W]: what caches encode."""
        rgb, alpha = self._image_pixels(self.items[index], self._plan(index, 0, augment=False))
        return _to_tensor(rgb, signed=True), None if alpha is None else torch.from_numpy(alpha.copy())

    def load_batch(self, indices: list[int], epoch: int, augment: bool = True) -> Batch:
        """Load one batch (all from one bucket). `augment=False` (validation) turns off flip, random crop and colour
        jitter."""
        items = [self.items[i] for i in indices]
        buckets = {it.bucket for it in items}
        if len(buckets) != 1:
            raise ValueError(f"a batch must come from one bucket, got {sorted(buckets)}")
        plans = [self._plan(i, epoch, augment) for i in indices]
        images, alphas, conds, latents = [], [], [], []
        for index, item, plan in zip(indices, items, plans):
            if self._latents is not None:
                latents.append(self._latents.get(index, plan.flipped))
                alpha = self._latents.get_alpha_mask(index) if item.subset.alpha_mask else None
                alphas.append(None if alpha is None else (alpha.flip(-1) if plan.flipped else alpha))
            else:
                rgb, alpha = self._image_pixels(item, plan)
                images.append(_to_tensor(rgb, signed=True))
                alphas.append(None if alpha is None else torch.from_numpy(alpha.copy()))
            if item.record.conditioning_path:
                conds.append(_to_tensor(self._conditioning_pixels(item, plan), signed=False))
        bw, bh = items[0].bucket
        alpha_masks = None
        if any(a is not None for a in alphas):
            alpha_masks = torch.stack([a if a is not None else torch.ones(bh, bw) for a in alphas])
        if conds and len(conds) != len(items):
            raise ConfigError("some images of a batch lack a conditioning image", table=self.config.table)
        return Batch(
            images=torch.stack(images) if images else None,
            captions=[self._caption(i, epoch) for i in indices],
            original_sizes=[(it.original_size[1], it.original_size[0]) for it in items],
            crop_top_lefts=[_crop_top_left(it, p) for it, p in zip(items, plans)],
            target_sizes=[(bh, bw)] * len(items),
            flipped=[p.flipped for p in plans],
            conditioning_images=torch.stack(conds) if conds else None,
            alpha_masks=alpha_masks,
            item_indices=list(indices),
            latents=torch.stack(latents) if latents else None,
            paths=[it.record.path for it in items],
            loss_weights=self._loss_weights(items),
        )

    def _loss_weights(self, items: list[DatasetItem]) -> torch.Tensor | None:
        """sd-scripts' per-sample loss weights: the dataset's prior_loss_weight for is_reg images, 1 otherwise."""
        prior = self.config.prior_loss_weight
        if prior == 1.0 or not any(it.record.is_reg for it in items):
            return None
        return torch.tensor([prior if it.record.is_reg else 1.0 for it in items], dtype=torch.float32)


def _crop_top_left(item: DatasetItem, plan: _Plan) -> tuple[int, int]:
    """(top, left) of the crop in resized-image pixels, as seen in the (possibly flipped) training image."""
    top, left = plan.crop_top_left
    if plan.flipped:
        left = item.resized_size[0] - item.bucket[0] - left
    return top, left
