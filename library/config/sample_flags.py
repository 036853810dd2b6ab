"""Flags of the sample images generated during training."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import flag

SAMPLE_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                   "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")


@dataclass
class SampleConfig:
    """sampling during training"""

    sample_prompts: str | None = flag(None, "prompt file (.txt), one prompt per line with --w/--h/--s/--d options")
    sample_every_n_steps: int | None = flag(None, "generate the samples every N steps")
    sample_every_n_epochs: int | None = flag(None, "generate the samples every N epochs")
    sample_at_first: bool = flag(False, "also generate the samples before the first step")
    sample_sampler: str = flag("ddim", "sampler of the SDXL samples (FLUX samples use its flow-matching Euler)",
                               choices=SAMPLE_SAMPLERS, type=str)
