"""Cached text-encoder outputs, for any model family (the encode function decides what is stored).

Disk layout: `<cache_dir>/<sha256(encoder_id NUL caption)[:32]>.te.safetensors`, one file per distinct caption,
with the caption and encoder identity in the metadata (checked on load, so a hash collision or a reused folder
cannot serve another caption's embedding). A caption that changes per epoch (shuffle, dropout) cannot be cached,
which `check_compatible` refuses up front.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterable, Literal

import torch
from tqdm import tqdm

from library.cache.storage import CacheCorrupt, load_tensors, read_metadata, save_tensors_atomic
from library.data.captions import caption_ops_active
from library.data.types import SubsetConfig
from library.errors import ConfigError

FORMAT_VERSION = "1"
TextEncodeFn = Callable[[list[str]], dict[str, torch.Tensor]]


def check_compatible(subsets: Iterable[SubsetConfig]) -> None:
    """Refuse text-encoder caching when a subset changes its captions per epoch."""
    for sub in subsets:
        if caption_ops_active(sub):
            raise ConfigError("caption shuffling or dropout (shuffle_caption, caption_dropout_rate, "
                              "caption_dropout_every_n_epochs, caption_tag_dropout_rate) is incompatible with "
                              "text-encoder output caching; turn those off or disable the caching",
                              table=sub.table)


class TextOutputCache:
    """Text-encoder outputs per caption, in memory or in `cache_dir` on disk."""

    def __init__(self, encoder_id: str, mode: Literal["memory", "disk"] = "memory", cache_dir: str | None = None):
        if mode not in ("memory", "disk"):
            raise ValueError(f"text cache mode must be 'memory' or 'disk', got {mode!r}")
        if mode == "disk" and not cache_dir:
            raise ValueError("a disk text-encoder cache needs a cache_dir")
        self.encoder_id, self.mode, self.cache_dir = encoder_id, mode, cache_dir
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    check_compatible = staticmethod(check_compatible)

    def path_for(self, caption: str) -> str:
        digest = hashlib.sha256(f"{self.encoder_id}\0{caption}".encode("utf-8")).hexdigest()[:32]
        return os.path.join(self.cache_dir or "", f"{digest}.te.safetensors")

    def _metadata(self, caption: str) -> dict[str, str]:
        return {"format_version": FORMAT_VERSION, "encoder_id": self.encoder_id, "caption": caption}

    def _is_valid(self, caption: str) -> bool:
        if self.mode == "memory":
            return caption in self._memory
        path = self.path_for(caption)
        if not os.path.exists(path):
            return False
        try:
            return read_metadata(path) == self._metadata(caption)
        except CacheCorrupt:
            return False

    def ensure(self, captions: list[str], encode_fn: TextEncodeFn, batch_size: int, progress: bool = True,
               shard: tuple[int, int] = (0, 1)) -> int:
        """Encode the captions not yet cached (validly); returns how many were encoded. `encode_fn` returns tensors
        whose first dimension is the batch. `shard=(rank, world)` encodes only every world-th caption (disk mode,
        several processes: each writes a disjoint share, then all read)."""
        rank, world = shard
        todo = [c for i, c in enumerate(dict.fromkeys(captions)) if i % world == rank and not self._is_valid(c)]
        for k in tqdm(range(0, len(todo), batch_size), desc="caching text encoder outputs",
                      disable=not progress or not todo):
            chunk = todo[k:k + batch_size]
            with torch.no_grad():
                outputs = encode_fn(chunk)
            for j, caption in enumerate(chunk):
                tensors = {name: t[j].detach().cpu().clone() for name, t in outputs.items()}
                if self.mode == "memory":
                    self._memory[caption] = tensors
                else:
                    save_tensors_atomic(self.path_for(caption), tensors, self._metadata(caption))
        return len(todo)

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        if self.mode == "memory":
            if caption not in self._memory:
                raise KeyError(f"caption not in the text-encoder cache (run ensure first): {caption!r}")
            return self._memory[caption]
        path = self.path_for(caption)
        if not os.path.exists(path):
            raise KeyError(f"caption not in the text-encoder cache {self.cache_dir} (run ensure first): {caption!r}")
        tensors, metadata = load_tensors(path)
        if metadata != self._metadata(caption):
            raise CacheCorrupt(f"{path}: cache file belongs to another caption or encoder; delete it")
        return tensors
