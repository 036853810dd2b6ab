"""Tiny FLUX-shaped models for tests, the demo and benchmarks, in the real file formats.

The real block layout is kept (double and single blocks, fused BFL projections, 16-channel autoencoder with 2x2
packing, CLIP-L + T5 text encoders) so that key names and LoRA names are the real ones; only widths and depths
shrink. Each model is initialised from its own seeded generator state, so one seed gives the same tensors in the
single-file and diffusers outputs. The T5 tokenizer is a small sentencepiece model trained at run time on a fixed
corpus (no PyPI package ships T5's): deterministic, so it too depends only on the code.
"""
from __future__ import annotations

import io
import os
from typing import Literal

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from library.errors import UserError
from library.models.flux_loader import FluxModels, save_flux_single_files
from library.models.tiny import build_seeded
from library.models.tiny_configs import TINY_SDXL_TE1
from library.models.tokenizers import shipped_clip_tokenizer

TinyFormat = Literal["single_file", "diffusers"]

TINY_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
TINY_FLUX_AE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32), layers_per_block=2, latent_channels=16, norm_num_groups=8, sample_size=64,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)
TINY_CLIP_L = dict(TINY_SDXL_TE1)  # CLIP-L's layout and real vocabulary; hidden 32 = pooled_projection_dim
TINY_T5_VOCAB = 128
TINY_T5 = dict(
    vocab_size=TINY_T5_VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    tie_word_embeddings=False,
)
# FLUX.1-dev's scheduler config: what FluxPipeline.from_pretrained expects in scheduler/.
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
_T5_CORPUS = (
    "a photo of a red circle on a white background", "a green square in the top left corner",
    "a blue shape at the bottom right", "a yellow circle and a small square", "the quick brown fox jumps over the dog",
    "restore this image, remove the noise and the blur", "a sharp high quality picture of a cat",
)


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)


def build_tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer (pad 0, eos 1, unk 2, unigram pieces) from a sentencepiece model trained on a fixed corpus."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_T5_CORPUS) * 8), model_writer=buf, vocab_size=TINY_T5_VOCAB // 2,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2,
    )
    proc = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(proc.id_to_piece(i), float(proc.get_score(i))) for i in range(proc.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_flux(seed: int = 0) -> FluxModels:
    """Randomly initialised tiny FLUX (float32, eval mode) with the shipped CLIP tokenizer and a tiny T5 one."""
    transformer, ae, clip_l, t5 = build_seeded(
        seed, 11, lambda: FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER), lambda: AutoencoderKL(**TINY_FLUX_AE),
        lambda: CLIPTextModel(CLIPTextConfig(**TINY_CLIP_L)), lambda: T5EncoderModel(T5Config(**TINY_T5)))
    return FluxModels(transformer, ae, clip_l, t5, shipped_clip_tokenizer(), build_tiny_t5_tokenizer())


def save_tiny_flux(path: str, fmt: TinyFormat = "single_file", seed: int = 0) -> str:
    """Write a tiny FLUX as a folder of single files (+ tokenizers) or a FluxPipeline folder; returns `path`."""
    models = build_tiny_flux(seed)
    os.makedirs(path, exist_ok=True)
    if fmt == "single_file":
        save_flux_single_files(models, path)
        models.tokenizer_clip.save_pretrained(os.path.join(path, "tokenizer"))
        models.tokenizer_t5.save_pretrained(os.path.join(path, "tokenizer_2"))
    elif fmt == "diffusers":
        pipe = FluxPipeline(scheduler=flux_scheduler(), vae=models.ae, text_encoder=models.clip_l,
                            tokenizer=models.tokenizer_clip, text_encoder_2=models.t5, tokenizer_2=models.tokenizer_t5,
                            transformer=models.transformer)
        pipe.save_pretrained(path, safe_serialization=True)
    else:
        raise UserError(f"unknown tiny-model format {fmt!r}: expected 'single_file' or 'diffusers'")
    return path
