"""The generation backends of the synthesis run, as one table: SDXL (sdxl_gen_img.py's generator) and FLUX
(flux_gen_img.py's generator).

Both generators take the same `ImageRequest`s, so the pipeline builds one request per sample and only the loading
differs: which loader reads the model files, which generator class runs them, the default guidance scale and
whether ControlNet-LLLite (an SDXL U-Net network) can be attached. LoRA training per backend is the table in
`library.synth.training`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from library.errors import ModelLoadError, UserError


class SampleGenerator(Protocol):
    """`SDXLGenerator` and `FluxGenerator` both: planned requests in, PNG paths out."""

    def generate(self, requests: Sequence[Any]) -> list[Any]: ...


@dataclass(frozen=True)
class ModelFiles:
    """The model flags of the generation scripts (FLUX's extra files are ignored by SDXL)."""

    model: str
    ae: str | None = None
    clip_l: str | None = None
    t5xxl: str | None = None
    t5xxl_max_token_length: int | None = None
    tokenizer_cache_dir: str | None = None


def _load_sdxl(files: ModelFiles, config: Any, device: Any) -> SampleGenerator:
    import torch

    from library.models.sdxl_loader import load_sdxl
    from library.sample.sdxl_generate import SDXLGenerator

    models = load_sdxl(files.model, torch.float32, files.tokenizer_cache_dir, False)
    return SDXLGenerator(models, config, device)


def _load_flux(files: ModelFiles, config: Any, device: Any) -> SampleGenerator:
    import torch

    from library.models.flux_loader import load_flux_files
    from library.sample.flux_generate import FluxGenerationConfig, FluxGenerator, FluxOptions

    models = load_flux_files(files.model, ae=files.ae, clip_l=files.clip_l, t5xxl=files.t5xxl, dtype=torch.float32,
                             tokenizer_cache_dir=files.tokenizer_cache_dir)
    options = FluxOptions(ae=files.ae, clip_l=files.clip_l, t5xxl=files.t5xxl,
                          t5xxl_max_token_length=files.t5xxl_max_token_length)
    return FluxGenerator(models, FluxGenerationConfig(config, options), device)


@dataclass(frozen=True)
class Backend:
    name: str
    family: str  # the ControlNet family of library.sample.controlnets ("sdxl" / "flux")
    default_scale: float  # SDXL: classifier-free guidance; FLUX.1 dev: distilled guidance
    lllite: bool  # ControlNet-LLLite attaches to SDXL's U-Net only
    network_module: str  # the LoRA module that reads the backend's LoRA files
    negative_prompt: bool
    load: Callable[[ModelFiles, Any, Any], SampleGenerator]


BACKENDS: dict[str, Backend] = {
    "sdxl": Backend("sdxl", "sdxl", 7.5, True, "networks.lora", True, _load_sdxl),
    "flux": Backend("flux", "flux", 3.5, False, "networks.lora_flux", False, _load_flux),
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"--backend: unknown backend '{name}'; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


UNION_CLASSES = ("ControlNetUnionModel",)


def controlnet_config(folder: str, backend: Backend) -> dict[str, Any]:
    """The diffusers ControlNet folder's config, checked against the backend before any model is loaded."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.isfile(path):
        raise ModelLoadError(f"--control_net_model '{folder}': not a diffusers ControlNet folder (no config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read it: {exc}") from None
    from library.sample.controlnets import CLASS_FAMILY

    name = config.get("_class_name", "ControlNetModel")
    if CLASS_FAMILY.get(name) != backend.family:
        raise UserError(f"--control_net_model '{folder}' is a {name}, which the {backend.name} backend cannot use "
                        f"(expected {', '.join(k for k, v in CLASS_FAMILY.items() if v == backend.family)})")
    return config


def is_union(config: dict[str, Any]) -> bool:
    """SDXL union models have their own class; FLUX union models are FluxControlNetModels with `num_mode`."""
    return config.get("_class_name") in UNION_CLASSES or config.get("num_mode") is not None


def controlnet_guide_types(folder: str | None, types: Sequence[str], made: Sequence[str], backend: Backend
                           ) -> tuple[list[str], bool]:
    """(conditioning types that guide the ControlNet, one per input; whether it is a union model).

    A union model takes one input per `--control_net_types` entry (its modes); a plain model takes one, the given
    type or else the first of `--controlnet_types` (canny when none)."""
    if not folder:
        if types:
            raise UserError("--control_net_types is given but no --control_net_model")
        return [], False
    union = is_union(controlnet_config(folder, backend))
    chosen = list(types) or [made[0] if made else "canny"]
    if union and not types:
        raise UserError(f"--control_net_model '{folder}' is a union model: give its control types with "
                        "--control_net_types, e.g. canny,depth")
    if not union and len(chosen) != 1:
        raise UserError(f"--control_net_model '{folder}' is not a union model: give one --control_net_types "
                        f"entry (the conditioning image that guides it), got {','.join(chosen)}")
    return chosen, union
