"""Merge kohya LoRA files into an SDXL model and save the result in the single-file layout."""
from __future__ import annotations

from typing import Sequence

import torch

from library.errors import UserError

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def merge_loras_into_sdxl(model_path: str, lora_files: Sequence[str], ratios: Sequence[float], save_to: str,
                          save_precision: str | None = None, allow_pickle: bool = False) -> int:
    """Returns the number of merged modules. The merge itself runs in fp32 whatever the save precision."""
    from library.models.sdxl_loader import load_sdxl, save_sdxl_single_file
    from networks.lora import load_weights_file, merge_lora_state_dict_into

    if len(ratios) not in (0, len(lora_files)):
        raise UserError(f"--ratios: {len(ratios)} value(s) for {len(lora_files)} LoRA file(s)")
    ratios = list(ratios) or [1.0] * len(lora_files)
    models = load_sdxl(model_path, dtype=torch.float32, allow_pickle=allow_pickle)
    merged = 0
    for file, ratio in zip(lora_files, ratios):
        sd, _ = load_weights_file(file)
        merged += merge_lora_state_dict_into([models.text_encoder1, models.text_encoder2], models.unet, sd, ratio)
    if save_precision:
        dtype = SAVE_DTYPES[save_precision]
        for m in (models.unet, models.text_encoder1, models.text_encoder2):
            m.to(dtype)
    save_sdxl_single_file(models, save_to, metadata={"merged_loras": ",".join(f"{f}:{r}" for f, r in zip(lora_files, ratios))})
    return merged
