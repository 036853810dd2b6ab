"""CLIP tokenizers for SDXL without a model hub.

Search order: the model folder (`tokenizer/`, `tokenizer_2/`), then `tokenizer_cache_dir` (same sub-folders), then
the CLIP files shipped in this package (library/models/tokenizers/clip/, built by tools/build_clip_tokenizer.py).
SDXL's two tokenizers share the vocabulary and differ only in padding: the first pads with `<|endoftext|>`, the
second (OpenCLIP-bigG) with `!` (id 0).
"""
from __future__ import annotations

import os

from transformers import CLIPTokenizer

from library.errors import ModelLoadError

SHIPPED_CLIP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizers", "clip")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
SDXL_TOKENIZER2_PAD = "!"


def _has_tokenizer(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "tokenizer.json")) or all(
        os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES
    )


def shipped_clip_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """The CLIP BPE tokenizer shipped with the package (77 tokens, lower-cased)."""
    if not _has_tokenizer(SHIPPED_CLIP_DIR):
        raise ModelLoadError(
            f"the shipped CLIP tokenizer files are missing from {SHIPPED_CLIP_DIR}: "
            "rebuild them with tools/build_clip_tokenizer.py"
        )
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(SHIPPED_CLIP_DIR, **kwargs)


def find_tokenizer_folder(subfolder: str, roots: list[str | None]) -> str | None:
    """First `<root>/<subfolder>` holding tokenizer files, or None."""
    for root in roots:
        if root:
            folder = os.path.join(root, subfolder)
            if os.path.isdir(folder) and _has_tokenizer(folder):
                return folder
    return None


def load_sdxl_tokenizers(
    model_dir: str | None = None, tokenizer_cache_dir: str | None = None
) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's (tokenizer, tokenizer_2) from the model folder, the cache folder or the shipped files."""
    roots = [model_dir, tokenizer_cache_dir]
    folder1 = find_tokenizer_folder("tokenizer", roots)
    folder2 = find_tokenizer_folder("tokenizer_2", roots)
    try:
        tok1 = CLIPTokenizer.from_pretrained(folder1) if folder1 else shipped_clip_tokenizer()
        tok2 = CLIPTokenizer.from_pretrained(folder2) if folder2 else shipped_clip_tokenizer(SDXL_TOKENIZER2_PAD)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the CLIP tokenizer from {folder1 or folder2 or SHIPPED_CLIP_DIR}: {exc}") from exc
    return tok1, tok2


def save_sdxl_tokenizers(tokenizers: tuple[CLIPTokenizer, CLIPTokenizer], folder: str) -> None:
    """Write both tokenizers as `<folder>/tokenizer` and `<folder>/tokenizer_2` (a `tokenizer_cache_dir` layout)."""
    tokenizers[0].save_pretrained(os.path.join(folder, "tokenizer"))
    tokenizers[1].save_pretrained(os.path.join(folder, "tokenizer_2"))
