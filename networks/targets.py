"""Which modules a kohya-style LoRA wraps, as plain data.

The choice follows sd-scripts' `networks/lora.py` so that files trained here have the same module set (and thus the
same keys) as published ones: a LoRA module is made for every `Linear` / `Conv2d` found *inside* a container module
whose class name is listed here. Class names, not types, are matched because the same container exists under several
classes (SDPA / flash variants of CLIP attention) and because the models come from two libraries.
"""
from __future__ import annotations

# U-Net containers always targeted: the transformer blocks (attention q/k/v/out, feed-forward, proj_in/proj_out).
# The U-Net is the diffusers `UNet2DConditionModel`; names are translated to SGM paths afterwards.
UNET_TARGET_CONTAINERS: tuple[str, ...] = ("Transformer2DModel",)

# Extra U-Net containers targeted only when `conv_dim` is given (LoCon). Inside them, Linear layers and 1x1 convs
# (time_emb_proj, conv_shortcut) get the linear rank (network_dim), 3x3 convs get conv_dim -- as sd-scripts does.
UNET_CONV_CONTAINERS: tuple[str, ...] = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

# Text-encoder containers: CLIP self-attention (q/k/v/out_proj) and MLP (fc1/fc2).
TEXT_ENCODER_TARGET_CONTAINERS: tuple[str, ...] = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2",
                                                   "CLIPMLP")

# Layer classes that can be wrapped (matched by isinstance on torch.nn classes of these names).
WRAPPABLE_LAYERS: tuple[str, ...] = ("Linear", "Conv2d")

# Name prefixes of the published files.
LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"  # a single text encoder (SD 1.x / 2.x files)
LORA_PREFIX_TEXT_ENCODER_N = "lora_te{index}"  # SDXL: lora_te1 (CLIP-L), lora_te2 (OpenCLIP bigG)

# Tensor key suffixes of one module in a kohya LoRA file.
KEY_DOWN = "lora_down.weight"
KEY_UP = "lora_up.weight"
KEY_ALPHA = "alpha"
