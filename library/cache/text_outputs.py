"""Cached text-encoder outputs, for any model family (the encode function decides what is stored).

Disk layout: `<cache_dir>/<sha256(encoder_id NUL caption)[:32]>.te.safetensors`, one file per distinct caption,
with the caption and encoder identity in the metadata. The encoder identity covers what changes the outputs for one
caption: the weights of every encoder, the tokenizers, and the family's settings such as the maximum token length
(see library.cache.provenance.text_identity). The metadata is checked on every read, not only at start-up: a file
that is missing, unreadable (damaged, or a hostile header) or made for another caption or encoder is re-encoded and
rewritten, never used. A caption that changes per epoch (shuffle, dropout) cannot be cached, which
`check_compatible` refuses up front.

A partial cache (sd-scripts' partial caching: with a CLIP-L LoRA, FLUX caches T5's outputs only and runs CLIP-L
every step) names the outputs it holds in its identity (library.cache.provenance.text_identity) and in every file's
metadata ("outputs"), so a full-cache run never reads its files, nor a partial run a full cache's.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from tqdm import tqdm

from library.cache.storage import (
    CacheCorrupt,
    load_tensors,
    read_metadata,
    save_tensors_atomic,
)
from library.data.captions import caption_ops_active
from library.data.types import SubsetConfig
from library.errors import ConfigError

logger = logging.getLogger(__name__)

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

    def __init__(self, encoder_id: str, mode: Literal["memory", "disk"] = "memory", cache_dir: str | None = None,
                 outputs: tuple[str, ...] | None = None, live_encoders: tuple[int, ...] = ()):
        """`outputs`: the output names a partial cache holds (None: a full cache, all of them). `live_encoders`:
        the text encoders (indices) whose outputs it does not hold, which the loop runs every step."""
        if mode not in ("memory", "disk"):
            raise ValueError(f"text cache mode must be 'memory' or 'disk', got {mode!r}")
        if mode == "disk" and not cache_dir:
            raise ValueError("a disk text-encoder cache needs a cache_dir")
        self.encoder_id, self.mode, self.cache_dir = encoder_id, mode, cache_dir
        self.outputs = tuple(sorted(outputs)) if outputs is not None else None
        self.live_encoders = tuple(live_encoders)
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._encode_fn: TextEncodeFn | None = None
        self._known: set[str] = set()  # the captions ensure() was given: the only ones get() may re-encode
        self.rebuilt_on_read = 0  # files found unusable when read during training (then re-encoded)

    check_compatible = staticmethod(check_compatible)

    def path_for(self, caption: str) -> str:
        digest = hashlib.sha256(f"{self.encoder_id}\0{caption}".encode("utf-8")).hexdigest()[:32]
        return os.path.join(self.cache_dir or "", f"{digest}.te.safetensors")

    @property
    def partial(self) -> bool:
        return self.outputs is not None

    def _metadata(self, caption: str) -> dict[str, str]:
        found = {"format_version": FORMAT_VERSION, "encoder_id": self.encoder_id, "caption": caption}
        if self.outputs is not None:  # a full cache's files keep the metadata they always had
            found["outputs"] = "partial:" + "+".join(self.outputs)
        return found

    def _problem(self, caption: str) -> str | None:
        """Why the cached output of `caption` cannot be used (None: it can)."""
        if self.mode == "memory":
            return None if caption in self._memory else "missing"
        path = self.path_for(caption)
        if not os.path.exists(path):
            return "missing"
        try:
            found = read_metadata(path)
        except CacheCorrupt:
            return "unreadable"
        return None if found == self._metadata(caption) else "made for another caption or encoder"

    def _is_valid(self, caption: str) -> bool:
        return self._problem(caption) is None

    def ensure(self, captions: list[str], encode_fn: TextEncodeFn, batch_size: int, progress: bool = True,
               shard: tuple[int, int] = (0, 1)) -> int:
        """Encode the captions not yet cached (validly); returns how many were encoded. `encode_fn` returns tensors
        whose first dimension is the batch, and is kept for re-encoding a file found stale when read.
        `shard=(rank, world)` encodes only every world-th caption (disk mode, several processes: each writes a
        disjoint share, then all read)."""
        rank, world = shard
        self._encode_fn = encode_fn
        self._known.update(captions)
        todo, stale = [], 0
        for i, caption in enumerate(dict.fromkeys(captions)):
            if i % world != rank:
                continue
            problem = self._problem(caption)
            if problem is not None:
                todo.append(caption)
                stale += problem != "missing"
        if stale:
            logger.warning("text-encoder cache: rebuilding %d file(s) in %s that cannot be used (unreadable or made "
                           "for another caption or encoder)", stale, self.cache_dir)
        for k in tqdm(range(0, len(todo), batch_size), desc="caching text encoder outputs",
                      disable=not progress or not todo):
            self._encode(todo[k:k + batch_size], encode_fn)
        return len(todo)

    def _encode(self, chunk: list[str], encode_fn: TextEncodeFn) -> dict[str, dict[str, torch.Tensor]]:
        with torch.no_grad():
            outputs = encode_fn(chunk)
        if self.outputs is not None and tuple(sorted(outputs)) != self.outputs:
            raise ValueError(f"a partial text-encoder cache of {self.outputs} was given outputs {sorted(outputs)}")
        written = {}
        for j, caption in enumerate(chunk):
            tensors = {name: t[j].detach().cpu().clone() for name, t in outputs.items()}
            if self.mode == "memory":
                self._memory[caption] = tensors
            else:
                save_tensors_atomic(self.path_for(caption), tensors, self._metadata(caption))
            written[caption] = tensors
        return written

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        if self.mode == "memory":
            if caption not in self._memory:
                raise KeyError(f"caption not in the text-encoder cache (run ensure first): {caption!r}")
            return self._memory[caption]
        path = self.path_for(caption)
        problem = None
        try:
            tensors, metadata = load_tensors(path)
            if metadata != self._metadata(caption):
                problem = "made for another caption or encoder"
        except CacheCorrupt:
            problem = "missing" if not os.path.exists(path) else "unreadable"
        if problem is None:
            return tensors
        if self._encode_fn is None or caption not in self._known:
            raise KeyError(f"caption not in the text-encoder cache {self.cache_dir} (run ensure first): {caption!r}")
        logger.warning("text-encoder cache: %s is %s; re-encoding it", path, problem)
        self.rebuilt_on_read += 1
        return self._encode([caption], self._encode_fn)[caption]
