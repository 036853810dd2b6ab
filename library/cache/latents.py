"""Cached VAE latents, so that training does not decode and encode every image on every step.

Disk layout: one file per image and bucket, beside the image:
    <image dir>/<image stem>_<bucketW>x<bucketH>.latents.safetensors        (alpha composited on white)
    <image dir>/<image stem>_<bucketW>x<bucketH>.alpha.latents.safetensors  (alpha_mask subsets: raw colours)
holding `latents` [C,h,w], `latents_flipped` (when any flip_aug subset uses the file) and, in `.alpha` files,
`alpha_mask` [H,W] at bucket resolution. The file name only locates the file; whether it is still valid is
decided by its metadata (source file size + mtime, sizes, bucket, crop, encoder identity, format version), so a
changed image, a new bucket setting or another VAE triggers a rebuild instead of silently training on stale data.

Caching needs pixels that are the same every epoch, so subsets with random_crop or color_aug are refused, as in
sd-scripts. In multi-process training, run `ensure` on the main process first, then on the others (which then
only validate).
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Literal

import torch
from tqdm import tqdm

from library.cache.storage import CacheCorrupt, load_tensors, read_metadata, save_tensors_atomic
from library.data.dataset import DatasetItem, TrainDataset
from library.data.images import choose_crop
from library.errors import ConfigError

FORMAT_VERSION = "1"
CacheMode = Literal["memory", "disk"]
# Features a file may hold beyond what is needed; a file with more is still valid.
_OPTIONAL_FLAGS = ("flip_included",)


def latent_cache_path(item: DatasetItem) -> str:
    stem, _ = os.path.splitext(item.record.path)
    kind = ".alpha" if item.subset.alpha_mask else ""
    return f"{stem}_{item.bucket[0]}x{item.bucket[1]}{kind}.latents.safetensors"


def expected_metadata(item: DatasetItem, encoder_id: str, flip: bool) -> dict[str, str]:
    """The provenance a valid cache file of `item` must carry (`flip`: whether it must hold flipped latents)."""
    st = os.stat(item.record.path)
    top, left = choose_crop(item.resized_size, item.bucket, "center", None)
    return {
        "format_version": FORMAT_VERSION,
        "encoder_id": encoder_id,
        "source_name": os.path.basename(item.record.path),
        "source_bytes": str(st.st_size),
        "source_mtime_ns": str(st.st_mtime_ns),
        "original_size": "%dx%d" % item.original_size,
        "bucket": "%dx%d" % item.bucket,
        "resized_size": "%dx%d" % item.resized_size,
        "crop_top_left": f"{top},{left}",
        "flip_included": str(flip).lower(),
        "alpha_mask": str(bool(item.subset.alpha_mask)).lower(),
    }


def metadata_matches(found: dict[str, str], expected: dict[str, str]) -> bool:
    for key, value in expected.items():
        if key in _OPTIONAL_FLAGS:
            if value == "true" and found.get(key) != "true":
                return False
        elif found.get(key) != value:
            return False
    return True


def check_cacheable(dataset: TrainDataset) -> None:
    """Latents are fixed pixels: refuse subsets whose pixels change per epoch."""
    for sub in dataset.config.subsets:
        for key in ("random_crop", "color_aug"):
            if getattr(sub, key):
                raise ConfigError(f"{key} changes the pixels every epoch, so latents cannot be cached; turn off "
                                  f"{key} or latent caching", table=sub.table, key=key)


class LatentCache:
    """Latents per dataset item, in memory or on disk beside the images. Bound to one dataset by `ensure`."""

    def __init__(self, encoder_id: str, mode: CacheMode = "disk"):
        if mode not in ("memory", "disk"):
            raise ValueError(f"latent cache mode must be 'memory' or 'disk', got {mode!r}")
        self.encoder_id = encoder_id
        self.mode = mode
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._meta: dict[int, dict[str, str]] = {}
        self._paths: dict[int, str] = {}

    def _is_valid(self, index: int, item: DatasetItem, expected: dict[str, str]) -> bool:
        if self.mode == "memory":
            return index in self._memory and metadata_matches(self._meta[index], expected)
        path = latent_cache_path(item)
        if not os.path.exists(path):
            return False
        try:
            return metadata_matches(read_metadata(path), expected)
        except CacheCorrupt:
            return False

    def ensure(self, dataset: TrainDataset, encode_fn: Callable[[torch.Tensor], torch.Tensor],
               batch_size: int, progress: bool = True, shard: tuple[int, int] = (0, 1)) -> int:
        """Encode every item whose cache is missing, stale or corrupt; returns how many were encoded. Images are
        encoded in batches of one bucket; `encode_fn` maps [B,3,H,W] pixels in [-1,1] to [B,C,h,w] latents.
        `shard=(rank, world)` encodes only every world-th item: several processes on a disk cache each write a
        disjoint share, wait for each other, then call ensure again unsharded, which only reads."""
        check_cacheable(dataset)
        # An image used by several subsets shares one file, which must hold what any of them needs.
        needs_flip = {latent_cache_path(item) for item in dataset.items if item.subset.flip_aug}
        todo: dict[tuple[int, int], list[int]] = defaultdict(list)
        expected, scheduled = {}, set()
        for index, item in enumerate(dataset.items):
            path = latent_cache_path(item)
            expected[index] = expected_metadata(item, self.encoder_id, path in needs_flip)
            if self.mode == "disk":
                self._paths[index] = path
                if path in scheduled:  # another item writes this very file
                    continue
            if index % shard[1] == shard[0] and not self._is_valid(index, item, expected[index]):
                todo[item.bucket].append(index)
                scheduled.add(path)
        total = sum(len(v) for v in todo.values())
        with tqdm(total=total, desc="caching latents", disable=not progress or total == 0) as bar:
            for bucket in sorted(todo):
                indices = todo[bucket]
                for k in range(0, len(indices), batch_size):
                    chunk = indices[k:k + batch_size]
                    self._encode_chunk(dataset, chunk, encode_fn, expected)
                    bar.update(len(chunk))
        return total

    def _encode_chunk(self, dataset: TrainDataset, chunk: list[int],
                      encode_fn: Callable[[torch.Tensor], torch.Tensor], expected: dict[int, dict[str, str]]) -> None:
        pixels = [dataset.load_item_pixels(i) for i in chunk]
        images = torch.stack([p[0] for p in pixels])
        flip_rows = [j for j, i in enumerate(chunk) if expected[i]["flip_included"] == "true"]
        with torch.no_grad():
            latents = encode_fn(images).detach().cpu()
            flipped = encode_fn(images[flip_rows].flip(-1)).detach().cpu() if flip_rows else None
        for j, index in enumerate(chunk):
            tensors = {"latents": latents[j].clone()}
            if j in flip_rows:
                tensors["latents_flipped"] = flipped[flip_rows.index(j)].clone()
            alpha = pixels[j][1]
            if dataset.items[index].subset.alpha_mask:
                tensors["alpha_mask"] = alpha if alpha is not None else torch.ones(images.shape[-2:])
            self._store(index, tensors, expected[index])

    def _store(self, index: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        if self.mode == "memory":
            self._memory[index], self._meta[index] = tensors, metadata
        else:
            save_tensors_atomic(self._paths[index], tensors, metadata)

    def _tensors(self, index: int) -> dict[str, torch.Tensor]:
        if self.mode == "memory":
            if index not in self._memory:
                raise KeyError(f"item {index} has no cached latents; run ensure() first")
            return self._memory[index]
        if index not in self._paths:
            raise KeyError(f"item {index} has no cached latents; run ensure() first")
        return load_tensors(self._paths[index])[0]

    def get(self, item_index: int, flipped: bool) -> torch.Tensor:
        tensors = self._tensors(item_index)
        key = "latents_flipped" if flipped else "latents"
        if key not in tensors:
            raise KeyError(f"item {item_index}: no {key} in the cache (flip_aug was off when it was built)")
        return tensors[key]

    def get_alpha_mask(self, item_index: int) -> torch.Tensor | None:
        return self._tensors(item_index).get("alpha_mask")
