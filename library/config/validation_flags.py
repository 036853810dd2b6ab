"""Flags of the held-out validation loss and the DINO / CLIP evaluation."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import flag


@dataclass
class ValidationConfig:
    """validation and evaluation (the held-out split: validation_split in the dataset config or --validation_split)"""

    validate_every_n_steps: int | None = flag(None, "compute the validation loss every N steps")
    validate_every_n_epochs: int | None = flag(None, "compute the validation loss every N epochs")
    max_validation_steps: int | None = flag(None, "use at most this many held-out batches per validation loss "
                                                  "(default: all)")
    eval_every_n_steps: int | None = flag(None, "sample the prompts and score DINO / CLIP-I / CLIP-T against the "
                                                "held-out images every N steps")
    eval_dino_model: str | None = flag(None, "local transformers folder of a DINO / DINOv2 ViT")
    eval_clip_model: str | None = flag(None, "local transformers folder of a CLIP model")
    eval_rare_token: str | None = flag(None, "token removed from the prompts for CLIP-T")

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_every_n_steps or self.eval_dino_model or self.eval_clip_model)
