"""SDXL prompt encoding as sd-scripts' generator does it: attention weights and prompts longer than 75 tokens.

Why not the pipeline's own encoding: it truncates at 75 tokens and reads ``(word:1.2)`` as text. Here a prompt is
tokenized run by run (`library.prompts.weighting`), cut at ``75 * --max_embeddings_multiples`` tokens, and encoded in
chunks of 75 tokens, each chunk wrapped in its own BOS/EOS (77 positions); the chunks' hidden states (the penultimate
layer of both text encoders) are concatenated along the sequence. Each token's embedding is multiplied by its weight
and the whole prompt is rescaled to keep its mean, as sd-scripts does. The pooled embedding comes from the first chunk
of the second text encoder. The batch is encoded at the chunk count of its longest prompt (or negative prompt), so a
prompt that fits in 75 tokens gives the same embedding as without --max_embeddings_multiples.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from library.prompts.weighting import weighted_tokens

logger = logging.getLogger(__name__)


@dataclass
class PromptEmbeds:
    """The four tensors the diffusers SDXL pipelines take instead of prompt text."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return dict(prompt_embeds=self.prompt_embeds, pooled_prompt_embeds=self.pooled_prompt_embeds,
                    negative_prompt_embeds=self.negative_prompt_embeds,
                    negative_pooled_prompt_embeds=self.negative_pooled_prompt_embeds)


def _chunk_count(lengths: Sequence[int], body: int, max_multiples: int) -> int:
    longest = max(lengths) if lengths else 0
    return max(1, min(max_multiples, (longest - 1) // body + 1 if longest else 1))


def _padded(ids: list[int], weights: list[float], chunks: int, body: int, tokenizer: Any) -> tuple[list, list]:
    """BOS + ids + EOS + pads over `chunks * body + 2` positions; the weights laid out per 77-position chunk."""
    total = chunks * body + 2
    padded = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    padded += [tokenizer.pad_token_id] * (total - len(padded))
    laid_out: list[float] = []
    for c in range(chunks):
        laid_out += [1.0] + weights[c * body:(c + 1) * body]
        laid_out += [1.0] * ((c + 1) * (body + 2) - len(laid_out))
    return padded, laid_out


def _encode_chunks(encoder: Any, tokens: torch.Tensor, chunks: int, body: int, eos: int, pad: int,
                   want_pool: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states (penultimate layer) of each 77-token chunk, concatenated; the pooled output of chunk 0."""
    hidden: list[torch.Tensor] = []
    pool = None
    for c in range(chunks):
        part = tokens[:, c * body:(c + 1) * body + 2].clone()
        part[:, 0] = tokens[0, 0]  # BOS at the head of every chunk
        if chunks > 1:
            if pad == eos:  # CLIP-L pads with EOS: the chunk always ends with it
                part[:, -1] = eos
            else:  # OpenCLIP pads with another token: end a chunk cut inside the text with EOS
                cut = (part[:, -1] != eos) & (part[:, -1] != pad)
                part[cut, -1] = eos
                empty = part[:, 1] == pad
                part[empty, 1] = eos
        out = encoder(part, output_hidden_states=True, return_dict=True)
        hidden.append(out.hidden_states[-2])
        if want_pool and pool is None:
            pool = out.text_embeds
    return torch.cat(hidden, dim=1), pool


def _weigh(embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each token by its weight, then restore each prompt's mean (sd-scripts' normalisation)."""
    before = embeds.float().mean(dim=(-2, -1))
    weighted = embeds * weights.unsqueeze(-1).to(embeds.dtype)
    after = weighted.float().mean(dim=(-2, -1))
    return weighted * (before / after).to(embeds.dtype)[:, None, None]


@torch.no_grad()
def encode_sdxl_prompts(tokenizers: Sequence[Any], text_encoders: Sequence[Any], prompts: Sequence[str],
                        negatives: Sequence[str], max_multiples: int, device: torch.device) -> PromptEmbeds:
    """Weighted, chunked embeddings of a batch of prompts and their negative prompts (same length lists)."""
    texts = list(prompts) + list(negatives)
    per_encoder: list[torch.Tensor] = []
    pooled = None
    warned = False
    for index, (tokenizer, encoder) in enumerate(zip(tokenizers, text_encoders)):
        body = tokenizer.model_max_length - 2
        parsed = [weighted_tokens(tokenizer, t, body * max_multiples) for t in texts]
        if any(p[2] for p in parsed) and not warned:
            logger.warning("a prompt is longer than %d tokens and was truncated; raise --max_embeddings_multiples "
                           "to keep more of it", body * max_multiples)
            warned = True
        chunks = _chunk_count([len(p[0]) for p in parsed], body, max_multiples)
        rows = [_padded(ids, weights, chunks, body, tokenizer) for ids, weights, _ in parsed]
        tokens = torch.tensor([r[0] for r in rows], dtype=torch.long, device=device)
        weights = torch.tensor([r[1] for r in rows], dtype=torch.float32, device=device)
        last = index == len(tokenizers) - 1
        hidden, pool = _encode_chunks(encoder, tokens, chunks, body, tokenizer.eos_token_id,
                                      tokenizer.pad_token_id, want_pool=last)
        per_encoder.append(_weigh(hidden, weights))
        if last:
            pooled = pool
    embeds = torch.cat(per_encoder, dim=-1)
    n = len(prompts)
    return PromptEmbeds(embeds[:n], pooled[:n], embeds[n:], pooled[n:])


__all__ = ["PromptEmbeds", "encode_sdxl_prompts", "weighted_tokens"]
