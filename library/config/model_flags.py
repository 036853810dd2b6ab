"""Flags of the base model: which checkpoint, which VAE, how it is loaded."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import flag


@dataclass
class ModelConfig:
    """model"""

    pretrained_model_name_or_path: str | None = flag(
        None, "base model: a single-file .safetensors checkpoint or a diffusers folder")
    tokenizer_cache_dir: str | None = flag(None, "folder with tokenizer files (for single-file checkpoints offline)")
    allow_pickle: bool = flag(False, "allow loading pickled .ckpt/.pt files and --resume state folders of earlier "
                                     "versions (they can run code: only trusted files)")
    vae: str | None = flag(None, "separate VAE to use instead of the checkpoint's (single file or diffusers folder)")
    no_half_vae: bool = flag(False, "keep the VAE in fp32 under mixed precision (the SDXL VAE overflows in fp16)")
    v_parameterization: bool = flag(False, "the model predicts v (v-prediction) instead of the noise")
    # sd-scripts requires --mixed_precision fp16/bf16 for both (checked where the run config is built)
    fp8_base: bool = flag(False, "store the frozen base model's weights in float8 (e4m3fn) and compute in the mixed-"
                                 "precision dtype, one layer at a time: SDXL puts the U-Net's blocks and the text "
                                 "encoders' Linears in fp8, FLUX the transformer's block Linears (its text encoders "
                                 "never); needs --mixed_precision fp16 or bf16")
    fp8_base_unet: bool = flag(False, "fp8 for the U-Net / transformer only, text encoders in the mixed-precision "
                                      "dtype (for FLUX the same as --fp8_base); needs --mixed_precision fp16 or bf16")
