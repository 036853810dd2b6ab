"""sd-scripts sampler names -> diffusers schedulers, with SDXL's noise schedule by default.

The table is plain data so that the metadata writer, the argument parser (choices) and the docs read the same
names without importing diffusers; diffusers is imported only when a scheduler is built.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Mapping

from library.errors import UserError

# SDXL's (and SD 1.x's) training noise schedule, as sd-scripts' generation scripts set it.
SDXL_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}

# name -> class (in diffusers), extra constructor arguments, A1111's label for the metadata, and how many noise
# tensors one step draws (the ancestral DPM2 draws two; a pipeline that pre-draws noise per seed needs to know).
# "steps_offset": 1 and "clip_sample": False are what sd-scripts sets where the class has them.
SAMPLERS: dict[str, dict[str, Any]] = {
    "ddim": {"class": "DDIMScheduler", "kwargs": {}, "label": "DDIM", "noises_per_step": 1},
    "pndm": {"class": "PNDMScheduler", "kwargs": {}, "label": "PNDM", "noises_per_step": 1},
    "lms": {"class": "LMSDiscreteScheduler", "kwargs": {}, "label": "LMS", "noises_per_step": 1},
    "euler": {"class": "EulerDiscreteScheduler", "kwargs": {}, "label": "Euler", "noises_per_step": 1},
    "euler_a": {"class": "EulerAncestralDiscreteScheduler", "kwargs": {}, "label": "Euler a", "noises_per_step": 1},
    "heun": {"class": "HeunDiscreteScheduler", "kwargs": {}, "label": "Heun", "noises_per_step": 1},
    "dpm_2": {"class": "KDPM2DiscreteScheduler", "kwargs": {}, "label": "DPM2", "noises_per_step": 1},
    "dpm_2_a": {"class": "KDPM2AncestralDiscreteScheduler", "kwargs": {}, "label": "DPM2 a", "noises_per_step": 2},
    "dpmsolver": {
        "class": "DPMSolverMultistepScheduler",
        # diffusers rejects the default final sigma of zero for the first-order-style "dpmsolver" algorithm
        "kwargs": {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        "label": "DPM-Solver",
        "noises_per_step": 1,
    },
    "dpmsolver++": {
        "class": "DPMSolverMultistepScheduler",
        "kwargs": {"algorithm_type": "dpmsolver++"},
        "label": "DPM++ 2M",
        "noises_per_step": 1,
    },
    # diffusers' own table maps A1111's "DPM++ SDE" to the single-step solver
    "dpmsingle": {
        "class": "DPMSolverSinglestepScheduler",
        "kwargs": {"lower_order_final": True},  # what diffusers would switch to anyway (with a warning)
        "label": "DPM++ SDE",
        "noises_per_step": 1,
    },
}

# k-diffusion style spellings that sd-scripts accepts for the same samplers
SAMPLER_ALIASES: dict[str, str] = {
    "k_lms": "lms",
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_heun": "heun",
    "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_a",
}

# every name a user may pass: canonical names first, then aliases
SAMPLER_NAMES: tuple[str, ...] = (*SAMPLERS, *SAMPLER_ALIASES)

# the choices of sd-scripts' `--sampler` (sdxl_gen_img.py), in its order: the command-line flag takes exactly these,
# as there (k_heun, which sample prompts accept here, is not among them)
SD_SCRIPTS_SAMPLER_CHOICES: tuple[str, ...] = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++", "dpmsingle",
    "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)

# settings sd-scripts forces where a scheduler class takes them
_QUIET_DEFAULTS: dict[str, Any] = {"steps_offset": 1, "clip_sample": False}

# classes that need an optional package diffusers does not install itself
_EXTRA_REQUIREMENTS: dict[str, str] = {"LMSDiscreteScheduler": "scipy"}


class SamplerNameError(UserError):
    """An unknown sampler name; the message lists the valid ones."""


def canonical_sampler_name(name: str) -> str:
    """Normalise a user-given sampler name (case, aliases) to a key of `SAMPLERS`."""
    key = name.strip().lower()
    key = SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        close = difflib.get_close_matches(key, SAMPLER_NAMES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SamplerNameError(f"unknown sampler '{name}'{hint}; valid names: {', '.join(SAMPLER_NAMES)}")
    return key


def a1111_sampler_label(name: str) -> str:
    """The label A1111 would write for this sampler (e.g. 'euler_a' -> 'Euler a'), for PNG metadata."""
    return SAMPLERS[canonical_sampler_name(name)]["label"]


def sampler_from_a1111_label(label: str) -> str | None:
    """The sd-scripts name for an A1111 label, or None when no sampler here matches it."""
    wanted = label.strip().casefold()
    for name, spec in SAMPLERS.items():
        if spec["label"].casefold() == wanted:
            return name
    return None


def noises_per_step(name: str) -> int:
    return SAMPLERS[canonical_sampler_name(name)]["noises_per_step"]


def _init_keys(cls: type) -> set[str] | None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values()):
        return None  # a placeholder class (missing optional dependency) or a catch-all: filter nothing
    return set(params) - {"self"}


def scheduler_config(name: str, base_config: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The diffusers class name and constructor arguments for a sampler, without importing diffusers.

    `base_config` (e.g. a model folder's scheduler_config.json, or {"prediction_type": "v_prediction"}) overrides
    the SDXL schedule; the sampler's own settings (e.g. DPM-Solver's algorithm) override both.
    """
    spec = SAMPLERS[canonical_sampler_name(name)]
    config = {**SDXL_SCHEDULE, **_QUIET_DEFAULTS}
    if base_config:
        config.update({k: v for k, v in base_config.items() if not k.startswith("_")})
    config.update(spec["kwargs"])
    return spec["class"], config


def make_scheduler(name: str, base_config: Mapping[str, Any] | None = None):
    """Build the diffusers scheduler for an sd-scripts sampler name (see `SAMPLER_NAMES`).

    Keys of the config that the chosen class does not take are dropped, so one base config (say, from an
    Euler scheduler_config.json) can seed any sampler.
    """
    class_name, config = scheduler_config(name, base_config)
    import diffusers  # deferred: the table and the labels must not pay for importing diffusers

    cls = getattr(diffusers, class_name)
    keys = _init_keys(cls)
    if keys is None:
        requirement = _EXTRA_REQUIREMENTS.get(class_name)
        if requirement is not None:
            try:
                __import__(requirement)
            except ImportError:
                raise UserError(
                    f"sampler '{name}' ({class_name}) needs the package '{requirement}': pip install {requirement}"
                ) from None
        return cls.from_config(config)
    return cls(**{k: v for k, v in config.items() if k in keys})


__all__ = [
    "SAMPLERS",
    "SAMPLER_ALIASES",
    "SAMPLER_NAMES",
    "SD_SCRIPTS_SAMPLER_CHOICES",
    "SDXL_SCHEDULE",
    "SamplerNameError",
    "a1111_sampler_label",
    "canonical_sampler_name",
    "make_scheduler",
    "noises_per_step",
    "sampler_from_a1111_label",
    "scheduler_config",
]
