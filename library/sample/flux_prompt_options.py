"""Which per-prompt options of the prompt language mean something for FLUX.1 (`flux_gen_img.py`).

Honoured as in sdxl_gen_img.py: `--w --h` size, `--s` steps, `--d` seeds, `--l` guidance (FLUX.1 dev's distilled
guidance), `--am` network multipliers, `--cn` control image (Kontext or ControlNet), `--f` file name, `--c` (recorded).
Refused before loading (library.sample.generation.reject_unet_prompt_options): `--nl`, Deep Shrink and gradual latent,
which change the image on SDXL and would silently not here.
Ignored with one warning each (a prompt file written for SDXL still runs and gives the images it can): the negative
prompt `--n` (FLUX.1 has none), the img2img strength `--t` (flux_gen_img.py has no img2img) and SDXL's size and crop
conditioning `--ow --oh --nw --nh --ct --cl` (FLUX.1 is not conditioned on them).
"""
from __future__ import annotations

from typing import Sequence

from library.config.environment_flags import warn_once
from library.prompts.language import PromptSpec

# PromptSpec field -> (the option, why FLUX ignores it)
FLUX_IGNORED_PROMPT_OPTIONS: dict[str, tuple[str, str]] = {
    "negative_template": ("--n", "FLUX.1 uses no negative prompt"),
    "strength": ("--t", "flux_gen_img.py has no img2img"),
    "original_width": ("--ow", "FLUX.1 has no size conditioning"),
    "original_height": ("--oh", "FLUX.1 has no size conditioning"),
    "original_width_negative": ("--nw", "FLUX.1 has no size conditioning"),
    "original_height_negative": ("--nh", "FLUX.1 has no size conditioning"),
    "crop_top": ("--ct", "FLUX.1 has no crop conditioning"),
    "crop_left": ("--cl", "FLUX.1 has no crop conditioning"),
}


def warn_ignored_flux_options(prompts: Sequence[PromptSpec]) -> list[str]:
    """One warning per SDXL-only option used on any prompt line (naming the first such line); returns the options."""
    used: list[str] = []
    for field_name, (option, why) in FLUX_IGNORED_PROMPT_OPTIONS.items():
        first = next((p for p in prompts if getattr(p, field_name, None) is not None), None)
        if first is None:
            continue
        where = f"prompt line {first.line_no}" if first.line_no else "the prompt"
        warn_once([f"{option} (first on {where}) is ignored by flux_gen_img.py: {why}"])
        used.append(option)
    return used


__all__ = ["FLUX_IGNORED_PROMPT_OPTIONS", "warn_ignored_flux_options"]
