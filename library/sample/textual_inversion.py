"""`--textual_inversion_embeddings`: sd-scripts' SDXL embedding files, loaded into both tokenizers and text encoders.

File layout (as sd-scripts' SDXL generator reads it): a .safetensors (or a torch file, optionally wrapped in
`string_to_param`) with two 2-D tensors, `clip_l` [N, 768-ish: text encoder 1's width] and `clip_g` [N, text
encoder 2's width]; the token is the file name without extension. N vectors become N new tokens `name`, `name1`, ...,
`name{N-1}` in both tokenizers, whose rows of the input-embedding tables are set to the vectors.

A prompt names only `name`; sd-scripts replaces that token by the N tokens when it tokenizes. Here the replacement is
done on the text (`TokenExpander.expand`) right before encoding, so both the pipeline's own encoding and the weighted
long-prompt encoding see it, and the PNG keeps the prompt as the user wrote it. The tokenizer matches added tokens
case-insensitively and longest first (`name12` before `name1`), and so does the expansion.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from library.errors import ModelLoadError, UserError

logger = logging.getLogger(__name__)

FLAG = "--textual_inversion_embeddings"
SDXL_KEYS = ("clip_l", "clip_g")  # text encoder 1, text encoder 2 (sd-scripts' names)


@dataclass(frozen=True)
class Embedding:
    """One file's token and its vectors per text encoder ([N, width] each, in `keys` order)."""

    token: str
    path: str
    vectors: tuple[torch.Tensor, ...]

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])

    def token_strings(self) -> list[str]:
        """sd-scripts' names of the N tokens: `name`, `name1`, ..., `name{N-1}`."""
        return [self.token] + [f"{self.token}{i + 1}" for i in range(self.num_vectors - 1)]


def _read_tensors(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"{FLAG} '{path}': no such file")
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            data: Any = load_file(path)
        else:  # tensors only: a safe load, so no --allow_pickle is needed
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ModelLoadError(f"{FLAG} '{path}': cannot read it as an embedding file ({exc})") from None
    if isinstance(data, Mapping) and isinstance(data.get("string_to_param"), Mapping):
        data = data["string_to_param"]
    if not isinstance(data, Mapping):
        raise ModelLoadError(f"{FLAG} '{path}': expected named tensors, found {type(data).__name__}")
    return data


def read_embedding(path: str, widths: Sequence[int], keys: Sequence[str] = SDXL_KEYS) -> Embedding:
    """One embedding file, checked against the text encoders' widths (one per key)."""
    data = _read_tensors(path)
    missing = [k for k in keys if not isinstance(data.get(k), torch.Tensor)]
    if missing:
        found = ", ".join(sorted(map(str, data))[:6]) or "nothing"
        raise ModelLoadError(f"{FLAG} '{path}': no '{missing[0]}' tensor (found: {found}); SDXL embeddings hold "
                             f"{' and '.join(repr(k) for k in keys)} tensors of shape [vectors, width]")
    vectors = []
    for key, width in zip(keys, widths):
        tensor = data[key]
        if tensor.dim() != 2 or tensor.shape[0] < 1 or tensor.shape[1] != width:
            raise ModelLoadError(f"{FLAG} '{path}': '{key}' has shape {tuple(tensor.shape)}, expected "
                                 f"[vectors, {width}] for this model's text encoder")
        vectors.append(tensor.detach().float())
    counts = {int(v.shape[0]) for v in vectors}
    if len(counts) != 1:
        raise ModelLoadError(f"{FLAG} '{path}': the tensors have different vector counts "
                             f"({', '.join(f'{k} {int(v.shape[0])}' for k, v in zip(keys, vectors))})")
    token = os.path.splitext(os.path.basename(path))[0]
    if not token or any(c.isspace() for c in token):
        raise UserError(f"{FLAG} '{path}': the file name gives the token, and '{token}' is not one word")
    return Embedding(token, path, tuple(vectors))


class TokenExpander:
    """Rewrites prompt text so that each embedding's token stands for all of its vectors (sd-scripts' replacement)."""

    def __init__(self, embeddings: Sequence[Embedding] = ()):
        self.replacements = {e.token.lower(): " ".join(e.token_strings()) for e in embeddings if e.num_vectors > 1}
        added = sorted({s for e in embeddings for s in e.token_strings()}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, added)), re.IGNORECASE) if self.replacements else None

    def expand(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(lambda m: self.replacements.get(m.group(0).lower(), m.group(0)), text)

    def __bool__(self) -> bool:
        return self._pattern is not None


def load_textual_inversion(paths: Sequence[str], tokenizers: Sequence[Any], text_encoders: Sequence[Any],
                           keys: Sequence[str] = SDXL_KEYS) -> TokenExpander:
    """Add every file's tokens to the tokenizers and its vectors to the text encoders' embedding tables."""
    widths = [te.get_input_embeddings().weight.shape[1] for te in text_encoders]
    embeddings = [read_embedding(os.fspath(p), widths, keys) for p in paths]
    for emb in embeddings:
        strings = emb.token_strings()
        for tokenizer in tokenizers:
            if tokenizer.add_tokens(strings) != len(strings):
                raise UserError(f"{FLAG} '{emb.path}': the token '{emb.token}' (the file name) or one of "
                                f"{strings[1:] or 'its numbered tokens'} is already taken (two files with one name?); "
                                "rename the file")
        logger.info("textual inversion '%s': %d vector(s) from %s", emb.token, emb.num_vectors, emb.path)
    for tokenizer, encoder, index in zip(tokenizers, text_encoders, range(len(keys))):
        encoder.resize_token_embeddings(len(tokenizer))
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for emb in embeddings:
                ids = tokenizer.convert_tokens_to_ids(emb.token_strings())
                table[ids] = emb.vectors[index].to(table.device, table.dtype)
    return TokenExpander(embeddings)


__all__ = ["Embedding", "SDXL_KEYS", "TokenExpander", "load_textual_inversion", "read_embedding"]
