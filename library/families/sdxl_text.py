"""SDXL caption encoding for training, with sd-scripts' `--max_token_length` and `--weighted_captions`.

Longer captions (150 or 225 tokens) are cut into 75-token pieces; each piece gets its own BOS and EOS and is encoded
as one 77-token sequence; the hidden states are joined as BOS + every piece's 75 inner positions + the last piece's
final position, so the U-Net sees 2 + 75n tokens. CLIP-G's pooled output is the first piece's, as sd-scripts does.
With `--weighted_captions`, `(word:1.2)` / `(word)` / `[word]` scale the hidden states of those tokens (no
re-normalisation, as sd-scripts' training does; the pooled output is not weighted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

    from library.config.training_flags import TrainingConfig

CHUNK_BODY = 75  # tokens between BOS and EOS in one CLIP sequence


@dataclass(frozen=True)
class TextOptions:
    """How captions are encoded; part of the text-encoder cache's provenance."""

    max_token_length: int | None = None  # None: 75 (one sequence)
    weighted_captions: bool = False

    @property
    def tag(self) -> str:
        """Empty for the defaults, so caches written before these options existed stay valid."""
        parts = []
        if self.max_token_length and self.max_token_length != CHUNK_BODY:
            parts.append(f"len{self.max_token_length}")
        if self.weighted_captions:
            parts.append("weighted")
        return "-".join(parts)


def chunked_ids(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> torch.Tensor:
    """(n, 77) pieces of one caption's (max_token_length + 2) ids: BOS + 75 ids + the closing id each.

    A tokenizer whose pad is not its EOS (CLIP-G's pads with '!') gets sd-scripts' fixes: a piece cut inside the
    text ends in EOS, and a piece that is all padding starts with EOS."""
    width = tokenizer.model_max_length
    total = ids.shape[0]
    pieces = []
    for i in range(1, total - width + 2, width - 2):
        piece = torch.cat([ids[:1], ids[i:i + width - 2], ids[-1:]])
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            if piece[-2] != tokenizer.eos_token_id and piece[-2] != tokenizer.pad_token_id:
                piece[-1] = tokenizer.eos_token_id
            if piece[1] == tokenizer.pad_token_id:
                piece[1] = tokenizer.eos_token_id
        pieces.append(piece)
    return torch.stack(pieces)


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str],
             opts: TextOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(b, n, 77) ids and, with weighted captions, (b, n, 77) weights (1 at BOS / EOS / padding)."""
    length = (opts.max_token_length or CHUNK_BODY) + 2
    all_ids, all_weights = [], []
    for caption in captions:
        if opts.weighted_captions:
            from library.prompts.weighting import weighted_tokens

            body, w, _ = weighted_tokens(tokenizer, caption, length - 2)
            pad = length - 2 - len(body)
            ids = torch.tensor([tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
                               + [tokenizer.pad_token_id] * pad)
            weights = torch.tensor([1.0, *w, 1.0] + [1.0] * pad)
        else:
            ids = tokenizer(caption, padding="max_length", truncation=True, max_length=length,
                            return_tensors="pt").input_ids[0]
            weights = None
        if length > tokenizer.model_max_length:
            pieces = chunked_ids(tokenizer, ids)
            if weights is not None:
                chunk_w = torch.ones(pieces.shape)
                for k, i in enumerate(range(1, length - tokenizer.model_max_length + 2, CHUNK_BODY)):
                    chunk_w[k, 1:1 + CHUNK_BODY] = weights[i:i + CHUNK_BODY]
                weights = chunk_w
            ids = pieces
        else:
            ids = ids.unsqueeze(0)
            weights = weights.unsqueeze(0) if weights is not None else None
        all_ids.append(ids)
        all_weights.append(weights)
    stacked_w = torch.stack(all_weights) if opts.weighted_captions else None
    return torch.stack(all_ids), stacked_w


def join_pieces(hidden: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """(b*n, 77, d) piece states -> (b, 2 + 75n, d): BOS, each piece's inner 75, the last position."""
    hidden = hidden.reshape(b, n * hidden.shape[1], hidden.shape[-1])
    if n == 1:
        return hidden
    width = hidden.shape[1] // n
    parts = [hidden[:, :1]] + [hidden[:, i:i + width - 2] for i in range(1, n * CHUNK_BODY, width)]
    return torch.cat(parts + [hidden[:, -1:]], dim=1)


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Scale each token's hidden state by its weight (b, n, 77) laid out as `join_pieces` lays out the states."""
    if weights is None:
        return hidden
    weights = weights.to(hidden.device, hidden.dtype)
    n = weights.shape[1]
    if n == 1:
        return hidden * weights[:, 0].unsqueeze(-1)
    hidden = hidden.clone()
    for k in range(n):
        span = slice(k * CHUNK_BODY + 1, k * CHUNK_BODY + 1 + CHUNK_BODY)
        hidden[:, span] = hidden[:, span] * weights[:, k, 1:1 + CHUNK_BODY].unsqueeze(-1)
    return hidden


def encode_captions(text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[PreTrainedTokenizerBase],
                    captions: list[str],
                    opts: TextOptions) -> dict[str, torch.Tensor]:
    """The U-Net's text conditioning for `captions`: penultimate-layer states of both encoders (joined over the
    pieces) and CLIP-G's pooled projection of the first piece."""
    te1, te2 = text_encoders
    device = next(te1.parameters()).device
    b = len(captions)
    states = []
    pooled = None
    for k, (te, tok) in enumerate(zip(text_encoders, tokenizers)):
        ids, weights = tokenize(tok, captions, opts)
        n = ids.shape[1]
        out = te(ids.reshape(b * n, -1).to(device), output_hidden_states=True)
        states.append(apply_weights(join_pieces(out.hidden_states[-2], b, n), weights))
        if k == 1:
            pooled = out.text_embeds.reshape(b, n, -1)[:, 0]  # the first piece's, as sd-scripts
    return {"encoder_hidden_states": torch.cat(states, dim=-1), "pooled": pooled}


def text_options_from(training: TrainingConfig, family_name: str) -> TextOptions | None:
    """The run's caption-encoding options for `family_name`, with one warning for each flag the family does not
    use (sd-scripts' SDXL and FLUX trainers ignore --clip_skip; FLUX's T5 length is --t5xxl_max_token_length)."""
    import logging

    log = logging.getLogger(__name__)
    if getattr(training, "clip_skip", None) is not None:
        log.warning("--clip_skip %s: not used; %s conditions on fixed text-encoder layers, as in sd-scripts",
                    training.clip_skip, family_name.upper())
    opts = TextOptions(getattr(training, "max_token_length", None), bool(getattr(training, "weighted_captions", False)))
    if family_name != "sdxl":
        if opts.tag:
            log.warning("--max_token_length / --weighted_captions: not used by %s (sd-scripts' FLUX trainer ignores "
                        "them too)", family_name.upper())
        return None
    return opts
