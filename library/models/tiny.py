"""Tiny SDXL-shaped models for tests, the demo and benchmarks, in the real file formats.

The weights depend only on the seed (each model is initialised from its own seeded generator state), so the
single-file and diffusers outputs of one seed hold the same tensors.
"""
from __future__ import annotations

import os
from typing import Callable, Literal

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.errors import UserError
from library.models.sdxl_loader import SDXLModels, save_sdxl_single_file
from library.models.tiny_configs import TINY_SDXL_TE1, TINY_SDXL_TE2, TINY_SDXL_UNET, TINY_SDXL_VAE
from library.models.tokenizers import load_sdxl_tokenizers

TinyFormat = Literal["single_file", "diffusers"]
# SDXL base's scheduler: what StableDiffusionXLPipeline.from_pretrained expects to find in scheduler/.
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
    use_karras_sigmas=False,
)


def seed_part(seed: int, offset: int) -> None:
    """Seed the global generator per model: module constructors draw their init from it."""
    torch.manual_seed(seed * 1000 + offset)


def build_seeded(seed: int, first_offset: int, *builders: Callable[[], torch.nn.Module]) -> list[torch.nn.Module]:
    """Build each model from its own seeded generator state (offsets first_offset, first_offset + 1, ...), so a
    model's weights do not depend on the others; the caller's generator state is left as it was. Eval mode."""
    models: list[torch.nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        for offset, build in enumerate(builders, start=first_offset):
            seed_part(seed, offset)
            models.append(build())
    for model in models:
        model.eval()
    return models


def build_tiny_sdxl(seed: int = 0) -> SDXLModels:
    """Randomly initialised tiny SDXL (float32, eval mode) with the shipped CLIP tokenizers."""
    unet, vae, te1, te2 = build_seeded(
        seed, 1, lambda: UNet2DConditionModel(**TINY_SDXL_UNET), lambda: AutoencoderKL(**TINY_SDXL_VAE),
        lambda: CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TE1)),
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TE2)))
    tok1, tok2 = load_sdxl_tokenizers()
    return SDXLModels(unet, vae, te1, te2, tok1, tok2)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)


def save_tiny_sdxl(path: str, fmt: TinyFormat = "single_file", seed: int = 0) -> str:
    """Write a tiny SDXL as one SGM .safetensors file or as a StableDiffusionXLPipeline folder; returns `path`."""
    models = build_tiny_sdxl(seed)
    if fmt == "single_file":
        save_sdxl_single_file(models, path, metadata={"tiny_model_seed": str(seed)})
    elif fmt == "diffusers":
        pipe = StableDiffusionXLPipeline(
            vae=models.vae, text_encoder=models.text_encoder1, text_encoder_2=models.text_encoder2,
            tokenizer=models.tokenizer1, tokenizer_2=models.tokenizer2, unet=models.unet, scheduler=sdxl_scheduler(),
        )
        os.makedirs(path, exist_ok=True)
        pipe.save_pretrained(path, safe_serialization=True)
    else:
        raise UserError(f"unknown tiny-model format {fmt!r}: expected 'single_file' or 'diffusers'")
    return path
