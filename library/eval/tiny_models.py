"""Tiny, randomly initialised DINO and CLIP folders in the real on-disk format, for tests and demos without a hub.

Their scores mean nothing about subjects, but they exercise the exact loading and embedding path that real models
(dino-vits16, dinov2-small, clip-vit-large-patch14) take: a transformers folder with config, weights and the
processor saved beside them. The CLIP tokenizer is the real one shipped in library/models/tokenizers/clip.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from library.eval.metrics import quiet_transformers

CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "models" / "tokenizers" / "clip"
TINY_IMAGE_SIZE = 32


def save_tiny_dino(folder: str | os.PathLike, seed: int = 0, kind: str = "vit") -> Path:
    """A 2-layer ViT ('vit', DINO v1 layout) or Dinov2 ('dinov2') with its image processor, 32 px input."""
    with quiet_transformers():  # importing an image processor without torchvision warns about its fallback
        from transformers import (BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor,
                                  ViTModel)

    folder = Path(folder)
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=TINY_IMAGE_SIZE,
                  patch_size=8)
    if kind == "vit":
        model = ViTModel(ViTConfig(intermediate_size=64, **common))
        processor = ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(mlp_ratio=2, **common))
        processor = BitImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                      crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    else:
        raise ValueError(f"unknown tiny DINO kind '{kind}' (expected 'vit' or 'dinov2')")
    with quiet_transformers():
        model.save_pretrained(str(folder))
        processor.save_pretrained(str(folder))
    return folder


def save_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A 2-layer CLIP (text and vision, 16-d projection) with a CLIPProcessor: real tokenizer, 32 px images."""
    with quiet_transformers():
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), local_files_only=True)
    torch.manual_seed(seed)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **layers),
        vision_config=dict(image_size=TINY_IMAGE_SIZE, patch_size=8, **layers),
        projection_dim=16,
    )
    with quiet_transformers():
        CLIPModel(config).save_pretrained(str(folder))
        image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                             crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


__all__ = ["save_tiny_clip", "save_tiny_dino"]
