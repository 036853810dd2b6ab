"""Flags of the latent and text-encoder caches."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import flag


@dataclass
class CacheConfig:
    """caching"""

    cache_latents: bool = flag(False, "encode every image once with the VAE and train on the kept latents "
                                      "(no per-step random crop or color augmentation)")
    cache_latents_to_disk: bool = flag(False, "store the latent caches beside the images, reused by later runs")
    vae_batch_size: int = flag(1, "images per VAE batch while caching latents")
    text_encoder_batch_size: int | None = flag(None, "captions per text-encoder batch while caching text-encoder "
                                                     "outputs (default: the dataset's batch size)")
    cache_text_encoder_outputs: bool = flag(False, "encode every caption once and train without the text encoders")
    cache_text_encoder_outputs_to_disk: bool = flag(False, "store the text-encoder caches on disk, reused by later "
                                                           "runs")
    text_encoder_cache_dir: str | None = flag(None, "folder for the text-encoder caches (default: "
                                                    "<output_dir>/te_cache)")
