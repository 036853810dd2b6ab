"""Identities that cache files record as provenance: of a source file's content, of an encoder's weights, of a
tokenizer.

A cache is only as trustworthy as what it compares. File size + mtime miss a replaced image that kept both (a copy
with preserved times, a re-export); a hash of five tensors misses two VAEs that differ elsewhere. So sources are
identified by a hash of their bytes, and encoders by a hash over every tensor of their state dict.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from typing import Any

import torch

# (path, size, mtime_ns, ctime_ns, inode) -> digest: a file is hashed once per run unless it changes on disk (ctime
# moves on every write and cannot be set back, unlike mtime). Memory only, so a later run never trusts a stale entry.
_SOURCE_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
_LOCK = threading.Lock()
_CHUNK = 1 << 20
# Tensors up to this many elements are hashed whole; larger ones through an evenly strided sample of about this
# many elements (a fine-tune or another model changes practically all of them), so that a multi-billion
# parameter text encoder is identified in about a second.
_FULL_HASH_ELEMENTS = 1 << 20


def source_digest(path: str) -> str:
    """blake2b of the file's bytes (hex, 32 chars). Reading an image is cheap next to encoding it; the result is
    kept in memory for as long as the file's size, times and inode stay the same."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    with _LOCK:
        found = _SOURCE_DIGESTS.get(key)
    if found is not None:
        return found
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _LOCK:
        _SOURCE_DIGESTS[key] = digest
    return digest


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() > _FULL_HASH_ELEMENTS:
        flat = flat[:: flat.numel() // _FULL_HASH_ELEMENTS]
    flat = flat.contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).cpu().numpy().tobytes()


def weights_digest(module: torch.nn.Module) -> str:
    """A hash over every parameter and buffer of `module`: names, shapes, dtypes and values (large tensors through
    a strided sample). Unlike a fingerprint of a few tensors, two models that differ in any layer differ here."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """Class, maximum length and vocabulary of a tokenizer: a different vocabulary or length gives different
    token ids, hence different text-encoder outputs for the same caption."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'model_max_length', None)}|".encode())
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        try:
            vocab = get_vocab()
        except Exception:  # some tokenizers cannot list their vocabulary; class and length still count
            vocab = {}
        for token, index in sorted(vocab.items(), key=lambda kv: kv[1]):
            h.update(f"{index}:{token}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def vae_identity(family_id: str, vae: torch.nn.Module) -> str:
    """The provenance of a latent: the family's identity of the VAE, every weight, and the latent scale and shift
    from its config (not part of the weights, yet they change every latent)."""
    cfg = getattr(vae, "config", None)
    scale = getattr(cfg, "scaling_factor", None)
    shift = getattr(cfg, "shift_factor", None)
    return f"{family_id}-w{weights_digest(vae)}-s{scale}-z{shift}"


def text_identity(family_id: str, encoders: Iterable[torch.nn.Module], tokenizers: Iterable[Any],
                  outputs: Iterable[str] | None = None) -> str:
    """The provenance of a text-encoder output: the family's identity (which names the settings it depends on,
    e.g. a maximum length), every encoder weight and every tokenizer. `outputs` names the outputs of a partial
    cache (sd-scripts' partial caching: FLUX's T5 outputs while CLIP-L is trained); a full cache (None) holds them
    all. The two never share an identity, so neither is read in place of the other."""
    weights = "-".join(weights_digest(te) for te in encoders)
    toks = "-".join(tokenizer_digest(t) for t in tokenizers)
    part = "" if outputs is None else "-partial:" + "+".join(sorted(outputs))
    return f"{family_id}-w{weights}-t{toks}{part}"
