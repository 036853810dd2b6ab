"""Cached VAE latents, so that training does not decode and encode every image on every step.

Disk layout: one file per image and bucket, beside the image:
    <image dir>/<image stem>_<bucketW>x<bucketH>.latents.safetensors        (alpha composited on white)
    <image dir>/<image stem>_<bucketW>x<bucketH>.alpha.latents.safetensors  (alpha_mask subsets: raw colours)
holding `latents` [C,h,w], `latents_flipped` (when any flip_aug subset uses the file) and, in `.alpha` files,
`alpha_mask` [H,W] at bucket resolution. An image outside its subset's folder (an absolute path in a metadata file)
gets its file in `<subset folder>/latent_cache/` instead, under a name hashed from its path: caches are only ever
written inside the folder the user named.

The file name only locates the file; whether it may be used is decided by its metadata (a hash of the source
file's bytes, sizes, bucket, crop, flip, encoder identity, format version), and that is checked on every read, not
only at start-up: another run sharing the folder (say with another VAE) may have rewritten a file since. A file
that does not match, or cannot be parsed at all, is re-encoded and rewritten, never used.

Caching needs pixels that are the same every epoch, so subsets with random_crop or color_aug are refused, as in
sd-scripts. In multi-process training, run `ensure` on the main process first, then on the others (which then
only validate).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Literal

import torch
from tqdm import tqdm

from library.cache.provenance import source_digest
from library.cache.storage import (
    CacheCorrupt,
    load_tensors,
    read_metadata,
    save_tensors_atomic,
)
from library.data.dataset import DatasetItem, TrainDataset
from library.data.images import choose_crop
from library.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = "2"  # 2: the source is identified by a hash of its bytes (1: by size and mtime)
CacheMode = Literal["memory", "disk"]
EncodeFn = Callable[[torch.Tensor], torch.Tensor]
EXTERNAL_CACHE_DIR = "latent_cache"
# Features a file may hold beyond what is needed; a file with more is still valid.
_OPTIONAL_FLAGS = ("flip_included",)


def subset_root(item: DatasetItem) -> str:
    """The folder the user named for the item's subset: image_dir, else the metadata file's folder."""
    sub = item.subset
    folder = sub.image_dir or (os.path.dirname(sub.metadata_file) if sub.metadata_file else None)
    return os.path.abspath(folder or os.path.dirname(item.record.path))


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def latent_cache_path(item: DatasetItem) -> str:
    stem, _ = os.path.splitext(item.record.path)
    kind = ".alpha" if item.subset.alpha_mask else ""
    tail = f"_{item.bucket[0]}x{item.bucket[1]}{kind}.latents.safetensors"
    root = subset_root(item)
    if _inside(os.path.dirname(os.path.abspath(item.record.path)), root):
        return stem + tail
    # An image outside the subset's folder: never write beside it; a name hashed from its full path keeps two
    # outside images with one file name apart.
    tag = hashlib.blake2b(os.path.abspath(item.record.path).encode("utf-8", "surrogatepass"),
                          digest_size=8).hexdigest()
    return os.path.join(root, EXTERNAL_CACHE_DIR, f"{tag}_{os.path.basename(stem)}{tail}")


def expected_metadata(item: DatasetItem, encoder_id: str, flip: bool) -> dict[str, str]:
    """The provenance a valid cache file of `item` must carry (`flip`: whether it must hold flipped latents)."""
    top, left = choose_crop(item.resized_size, item.bucket, "center", None)
    return {
        "format_version": FORMAT_VERSION,
        "encoder_id": encoder_id,
        "source_name": os.path.basename(item.record.path),
        "source_bytes": str(os.path.getsize(item.record.path)),
        "source_blake2b": source_digest(item.record.path),
        "original_size": "%dx%d" % item.original_size,
        "bucket": "%dx%d" % item.bucket,
        "resized_size": "%dx%d" % item.resized_size,
        "crop_top_left": f"{top},{left}",
        "flip_included": str(flip).lower(),
        "alpha_mask": str(bool(item.subset.alpha_mask)).lower(),
    }


def mismatched_key(found: dict[str, str], expected: dict[str, str]) -> str | None:
    """The first provenance key on which `found` fails `expected` (None: the file is valid)."""
    for key, value in expected.items():
        if key in _OPTIONAL_FLAGS:
            if value == "true" and found.get(key) != "true":
                return key
        elif found.get(key) != value:
            return key
    return None


def metadata_matches(found: dict[str, str], expected: dict[str, str]) -> bool:
    return mismatched_key(found, expected) is None


def check_cacheable(dataset: TrainDataset) -> None:
    """Latents are fixed pixels: refuse subsets whose pixels change per epoch."""
    for sub in dataset.config.subsets:
        for key in ("random_crop", "color_aug"):
            if getattr(sub, key):
                raise ConfigError(f"{key} changes the pixels every epoch, so latents cannot be cached; turn off "
                                  f"{key} or latent caching", table=sub.table, key=key)


class LatentCache:
    """Latents per dataset item, in memory or on disk beside the images. Bound to one dataset by `ensure`, which
    also keeps the encode function: a file found stale or unreadable at read time is re-encoded on the spot."""

    def __init__(self, encoder_id: str, mode: CacheMode = "disk"):
        if mode not in ("memory", "disk"):
            raise ValueError(f"latent cache mode must be 'memory' or 'disk', got {mode!r}")
        self.encoder_id = encoder_id
        self.mode = mode
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._meta: dict[int, dict[str, str]] = {}
        self._paths: dict[int, str] = {}
        self._flip: dict[int, bool] = {}
        self._dataset: TrainDataset | None = None
        self._encode_fn: EncodeFn | None = None
        self.rebuilt_on_read = 0  # files found stale or unreadable when read during training (then re-encoded)

    def _expected(self, index: int) -> dict[str, str]:
        assert self._dataset is not None
        item = self._dataset.items[index]
        try:
            return expected_metadata(item, self.encoder_id, self._flip[index])
        except OSError as e:  # the image was removed or made unreadable during the run
            raise UserError(f"{item.record.path}: training image cannot be read any more "
                            f"({type(e).__name__}: {e.strerror or e}); restore it or restart without it") from None

    def _disk_problem(self, path: str, expected: dict[str, str]) -> str | None:
        """Why the file at `path` cannot be used (None: it can): missing, unreadable, or the provenance key that
        differs."""
        if not os.path.exists(path):
            return "missing"
        try:
            key = mismatched_key(read_metadata(path), expected)
        except CacheCorrupt:
            return "unreadable"
        return None if key is None else key

    def ensure(self, dataset: TrainDataset, encode_fn: EncodeFn,
               batch_size: int, progress: bool = True, shard: tuple[int, int] = (0, 1)) -> int:
        """Encode every item whose cache is missing, stale or corrupt; returns how many were encoded. Images are
        encoded in batches of one bucket; `encode_fn` maps [B,3,H,W] pixels in [-1,1] to [B,C,h,w] latents.
        `shard=(rank, world)` encodes only every world-th item: several processes on a disk cache each write a
        disjoint share, wait for each other, then call ensure again unsharded, which only reads."""
        check_cacheable(dataset)
        self._dataset, self._encode_fn = dataset, encode_fn
        # An image used by several subsets shares one file, which must hold what any of them needs.
        needs_flip = {latent_cache_path(item) for item in dataset.items if item.subset.flip_aug}
        todo: dict[tuple[int, int], list[int]] = defaultdict(list)
        expected, scheduled = {}, set()
        reasons: Counter = Counter()
        for index, item in enumerate(dataset.items):
            path = latent_cache_path(item)
            self._flip[index] = path in needs_flip
            expected[index] = expected_metadata(item, self.encoder_id, self._flip[index])
            if self.mode == "disk":
                self._paths[index] = path
                if path in scheduled:  # another item writes this very file
                    continue
            if index % shard[1] != shard[0]:
                continue
            if self.mode == "memory":
                problem = None if index in self._memory and metadata_matches(self._meta[index], expected[index]) \
                    else "missing"
            else:
                problem = self._disk_problem(path, expected[index])
            if problem is not None:
                reasons[problem] += 1
                todo[item.bucket].append(index)
                scheduled.add(path)
        stale = {k: n for k, n in reasons.items() if k != "missing"}
        if stale:
            logger.warning("latent cache: rebuilding %d file(s) that cannot be used (%s)", sum(stale.values()),
                           ", ".join(f"{k}: {n}" for k, n in sorted(stale.items())))
        total = sum(len(v) for v in todo.values())
        with tqdm(total=total, desc="caching latents", disable=not progress or total == 0) as bar:
            for bucket in sorted(todo):
                indices = todo[bucket]
                for k in range(0, len(indices), batch_size):
                    chunk = indices[k:k + batch_size]
                    self._encode_chunk(dataset, chunk, encode_fn, expected)
                    bar.update(len(chunk))
        return total

    def _encode_chunk(self, dataset: TrainDataset, chunk: list[int], encode_fn: EncodeFn,
                      expected: dict[int, dict[str, str]]) -> dict[int, dict[str, torch.Tensor]]:
        pixels = [dataset.load_item_pixels(i) for i in chunk]
        images = torch.stack([p[0] for p in pixels])
        flip_rows = [j for j, i in enumerate(chunk) if expected[i]["flip_included"] == "true"]
        with torch.no_grad():
            latents = encode_fn(images).detach().cpu()
            flipped = encode_fn(images[flip_rows].flip(-1)).detach().cpu() if flip_rows else None
        written = {}
        for j, index in enumerate(chunk):
            tensors = {"latents": latents[j].clone()}
            if j in flip_rows:
                tensors["latents_flipped"] = flipped[flip_rows.index(j)].clone()
            alpha = pixels[j][1]
            if dataset.items[index].subset.alpha_mask:
                tensors["alpha_mask"] = alpha if alpha is not None else torch.ones(images.shape[-2:])
            self._store(index, tensors, expected[index])
            written[index] = tensors
        return written

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
        if index not in self._paths or self._dataset is None:
            raise KeyError(f"item {index} has no cached latents; run ensure() first")
        path = self._paths[index]
        expected = self._expected(index)
        try:
            tensors, found = load_tensors(path)
            problem = mismatched_key(found, expected)
        except CacheCorrupt:
            problem = "missing" if not os.path.exists(path) else "unreadable"
        if problem is None:
            return tensors
        # Another run sharing the folder rewrote it, the image changed, or the file was damaged: never use it.
        logger.warning("latent cache: %s is %s; re-encoding it", path,
                       problem if problem in ("missing", "unreadable") else f"stale ({problem} differs)")
        self.rebuilt_on_read += 1
        assert self._encode_fn is not None
        return self._encode_chunk(self._dataset, [index], self._encode_fn, {index: expected})[index]

    def get(self, item_index: int, flipped: bool) -> torch.Tensor:
        tensors = self._tensors(item_index)
        key = "latents_flipped" if flipped else "latents"
        if key not in tensors:
            raise KeyError(f"item {item_index}: no {key} in the cache (flip_aug was off when it was built)")
        return tensors[key]

    def get_alpha_mask(self, item_index: int) -> torch.Tensor | None:
        return self._tensors(item_index).get("alpha_mask")
