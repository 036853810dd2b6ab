"""Pretrained ControlNets for generation: loading diffusers ControlNet / ControlNet-Union / FLUX ControlNet models from
folders or single files, the union models' mode names, and the pipelines and call arguments that use them.

Why here and not in each script: `sdxl_gen_img.py` and `flux_gen_img.py` take the same flags
(`--control_net_models`, `--guide_image_path`, `--control_net_weights`, `--control_net_ratios`,
`--control_net_types`); only the model classes and the diffusers pipeline differ per family.

A single `.safetensors` file in diffusers key layout carries no config. Its config is read, in this order, from the
file's `config` metadata (JSON), a `config.json` beside it, or derived from the base model as
`ControlNetModel.from_unet` would build it (block counts and the conditioning embedding come from the file's shapes).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from library.errors import ModelLoadError, UserError

logger = logging.getLogger(__name__)

Family = Literal["sdxl", "flux"]

# Union-model control modes by name. SDXL: xinsir's controlnet-union-sdxl-1.0 / ProMax (diffusers
# ControlNetUnionModel); FLUX: InstantX / Shakker-Labs FLUX.1-dev ControlNet-Union. Integers are accepted as well.
SDXL_UNION_MODES: dict[str, int] = {
    "openpose": 0, "pose": 0, "depth": 1, "hed": 2, "pidi": 2, "scribble": 2, "ted": 2, "softedge": 2,
    "canny": 3, "lineart": 3, "anime_lineart": 3, "mlsd": 3, "normal": 4, "segment": 5, "seg": 5, "tile": 6,
    "repaint": 7, "inpaint": 7, "outpaint": 7,
}
FLUX_UNION_MODES: dict[str, int] = {
    "canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "openpose": 4, "gray": 5, "lq": 6, "low_quality": 6,
}
UNION_MODES: dict[Family, dict[str, int]] = {"sdxl": SDXL_UNION_MODES, "flux": FLUX_UNION_MODES}
CLASS_FAMILY = {"ControlNetModel": "sdxl", "ControlNetUnionModel": "sdxl", "FluxControlNetModel": "flux"}


@dataclass(frozen=True)
class ControlNetSpec:
    """One `--control_net_models` entry with its flags; `guides` holds one guide path (file or folder) per input
    (one per mode for a union model with several `--control_net_types`, else one)."""

    path: str
    guides: tuple[str, ...]
    weight: float = 1.0
    ratio: float = 1.0  # fraction of the steps (from the start) it acts on: diffusers' control_guidance_end
    types: tuple[str, ...] = ()

    @property
    def inputs(self) -> int:
        return max(1, len(self.types))


@dataclass
class LoadedControlNet:
    spec: ControlNetSpec
    model: torch.nn.Module
    union: bool
    modes: tuple[int | None, ...]  # one per input; None for a plain model
    position: int = 0  # index among the run's --control_net_models (models with ratio 0 are not loaded)


def mode_index(name: str, family: Family, where: str) -> int:
    """A union mode from its name (canny, depth, ...) or its number."""
    key = name.strip().lower()
    if key.isdigit():
        return int(key)
    table = UNION_MODES[family]
    if key not in table:
        raise UserError(f"{where}: unknown control type '{name}' for {family.upper()} union models; expected a number "
                        f"or one of {', '.join(sorted(table))}")
    return table[key]


def check_specs(specs: Sequence[ControlNetSpec]) -> None:
    """File checks that need no model (run before loading anything)."""
    for i, spec in enumerate(specs):
        if not os.path.exists(spec.path):
            raise ModelLoadError(f"--control_net_models '{spec.path}': no such file or folder")
        if not spec.guides:
            raise UserError(f"--control_net_models '{spec.path}': needs a guide image (--guide_image_path)")
        if spec.weight < 0:
            raise UserError(f"--control_net_weights: weight {spec.weight} of model {i + 1} is negative")
        if not 0.0 <= spec.ratio <= 1.0:
            raise UserError(f"--control_net_ratios: {spec.ratio} (model {i + 1}) must be between 0 and 1")


# ----------------------------------------------------------------------------------------------------- loading


def _folder_class(folder: str) -> str:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"--control_net_models '{folder}': no config.json (expected a diffusers ControlNet folder)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("_class_name", "ControlNetModel")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read it: {exc}") from None


def _model_class(name: str, path: str, family: Family):
    import diffusers

    if CLASS_FAMILY.get(name) != family:
        known = ", ".join(k for k, v in CLASS_FAMILY.items() if v == family)
        raise ModelLoadError(f"--control_net_models '{path}': a {name}, which this {family.upper()} script cannot use "
                             f"(expected {known})")
    return getattr(diffusers, name)


def _file_config(path: str, metadata: dict[str, str] | None) -> dict[str, Any] | None:
    raw = (metadata or {}).get("config")
    if raw:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path}: metadata 'config' is not JSON: {exc}") from None
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.isfile(beside):
        with open(beside, encoding="utf-8") as f:
            return json.load(f)
    return None


def _count(keys, prefix: str) -> int:
    rx = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _cond_embedding_channels(sd: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """ControlNetConditioningEmbedding's channels: conv_in, then every second block conv raises the width."""
    channels = [sd["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    n = _count(sd, "controlnet_cond_embedding.blocks")
    channels += [sd[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0] for i in range(1, n, 2)]
    return tuple(channels)


def _derived_sdxl(sd: dict[str, torch.Tensor], base: Any, path: str) -> torch.nn.Module:
    from diffusers import ControlNetModel, ControlNetUnionModel

    cls = ControlNetUnionModel if "task_embedding" in sd else ControlNetModel
    try:
        return cls.from_unet(base, conditioning_embedding_out_channels=_cond_embedding_channels(sd),
                             load_weights_from_unet=False)
    except KeyError as exc:
        raise ModelLoadError(f"{path}: not a diffusers-layout SDXL ControlNet (no {exc} tensor)") from None


def _derived_flux(sd: dict[str, torch.Tensor], base: Any) -> torch.nn.Module:
    from diffusers import FluxControlNetModel

    keep = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
            "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    config = {k: base.config[k] for k in keep}
    config["num_layers"] = _count(sd, "transformer_blocks")
    config["num_single_layers"] = _count(sd, "single_transformer_blocks")
    if "controlnet_mode_embedder.weight" in sd:
        config["num_mode"] = sd["controlnet_mode_embedder.weight"].shape[0]
    if "input_hint_block.conv_in.weight" in sd:
        config["conditioning_embedding_channels"] = sd["input_hint_block.conv_in.weight"].shape[1]
    return FluxControlNetModel(**config)


def _load_file(path: str, family: Family, base: Any) -> torch.nn.Module:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.endswith(".safetensors"):
        raise ModelLoadError(f"--control_net_models '{path}': expected a diffusers folder or a .safetensors file")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        sd = load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ModelLoadError(f"{path}: cannot read it as safetensors: {exc}") from None
    config = _file_config(path, metadata)
    if config is not None:
        cls = _model_class(config.get("_class_name", "FluxControlNetModel" if family == "flux" else "ControlNetModel"),
                           path, family)
        model = cls.from_config(config)
    else:
        model = _derived_sdxl(sd, base, path) if family == "sdxl" else _derived_flux(sd, base)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ModelLoadError(f"{path}: does not fit a {type(model).__name__} for this base model: {len(missing)} "
                             f"key(s) missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path}: tensor shapes do not fit the ControlNet config: {exc}") from None
    return model


def load_controlnet(spec: ControlNetSpec, family: Family, base: Any, device: torch.device,
                    dtype: torch.dtype) -> LoadedControlNet:
    """One ControlNet from a diffusers folder or a .safetensors file; `base` is the U-Net / FLUX transformer."""
    if os.path.isdir(spec.path):
        cls = _model_class(_folder_class(spec.path), spec.path, family)
        try:
            model = cls.from_pretrained(spec.path)
        except Exception as exc:  # noqa: BLE001 - the user needs the folder and the reason
            raise ModelLoadError(f"--control_net_models '{spec.path}': cannot load {cls.__name__}: {exc}") from None
    else:
        model = _load_file(spec.path, family, base)
    param = next(model.parameters())
    if param.device != device or param.dtype != dtype:  # diffusers warns on every cast, even a no-op one
        model.to(device, dtype)
    model.eval()
    union = type(model).__name__ == "ControlNetUnionModel" or getattr(model, "union", False)
    where = f"--control_net_types for '{spec.path}'"
    if union and not spec.types:
        raise UserError(f"{where}: '{spec.path}' is a union model: give its control type(s), e.g. canny,depth")
    if not union and spec.types:
        raise UserError(f"{where}: '{spec.path}' is not a union model; drop its control types")
    modes = tuple(mode_index(t, family, where) for t in spec.types) if union else (None,)
    limit = (model.config.get("num_control_type") or model.config.get("num_mode")) if union else None
    if limit is not None and any(m >= limit for m in modes):
        raise UserError(f"{where}: mode numbers {modes} must be below the model's {limit}")
    return LoadedControlNet(spec, model, union, modes)


def load_controlnets(specs: Sequence[ControlNetSpec], family: Family, base: Any, device: torch.device,
                     dtype: torch.dtype) -> list[LoadedControlNet]:
    """The ControlNets that act on at least one step (a ratio of 0 means: not used at all)."""
    loaded = []
    for position, spec in enumerate(specs):
        if spec.ratio <= 0:
            logger.info("%s: ratio 0, not used", spec.path)
            continue
        net = load_controlnet(spec, family, base, device, dtype)
        net.position = position
        loaded.append(net)
    return loaded


# ----------------------------------------------------------------------------------------------------- pipelines


def build_sdxl_pipeline(base_pipe: Any, loaded: Sequence[LoadedControlNet]) -> Any:
    """An SDXL ControlNet (or ControlNet-Union) pipeline sharing the base pipeline's components."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLControlNetUnionPipeline
    from diffusers.models.controlnets import MultiControlNetModel

    unions = [c.union for c in loaded]
    if any(unions) and not all(unions):
        raise UserError("--control_net_models: union and plain SDXL ControlNets cannot be combined in one run")
    models = [c.model for c in loaded]
    if all(unions):
        cls, controlnet = StableDiffusionXLControlNetUnionPipeline, models[0] if len(models) == 1 else models
    else:
        cls = StableDiffusionXLControlNetPipeline
        controlnet = models[0] if len(models) == 1 else MultiControlNetModel(models)
    parts = {k: v for k, v in base_pipe.components.items() if k != "controlnet"}
    pipe = cls(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_call_kwargs(loaded: Sequence[LoadedControlNet], images: Sequence[Sequence[list]]) -> dict[str, Any]:
    """`images[m][i]` is the list of batch images (PIL) of model m's input i."""
    single = len(loaded) == 1
    if loaded[0].union:
        return dict(control_image=images[0] if single else [list(x) for x in images],
                    control_mode=list(loaded[0].modes) if single else [list(c.modes) for c in loaded],
                    controlnet_conditioning_scale=[c.spec.weight for c in loaded] if not single
                    else loaded[0].spec.weight,
                    control_guidance_end=[c.spec.ratio for c in loaded] if not single else loaded[0].spec.ratio)
    return dict(image=images[0][0] if single else [x[0] for x in images],
                controlnet_conditioning_scale=loaded[0].spec.weight if single else [c.spec.weight for c in loaded],
                control_guidance_end=loaded[0].spec.ratio if single else [c.spec.ratio for c in loaded])


def build_flux_pipeline(base_pipe: Any, loaded: Sequence[LoadedControlNet]) -> Any:
    """A FluxControlNetPipeline; every input (a union model's mode counts as one) gets its own slot."""
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

    nets = [c.model for c in loaded for _ in c.modes]
    parts = {k: v for k, v in base_pipe.components.items() if k != "controlnet"}
    pipe = FluxControlNetPipeline(**parts, controlnet=FluxMultiControlNetModel(nets))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_call_kwargs(loaded: Sequence[LoadedControlNet], images: Sequence[Sequence[list]]) -> dict[str, Any]:
    slots = [(c, mode, imgs) for c, per_input in zip(loaded, images) for mode, imgs in zip(c.modes, per_input)]
    return dict(control_image=[imgs for _, _, imgs in slots], control_mode=[m for _, m, _ in slots],
                controlnet_conditioning_scale=[c.spec.weight for c, _, _ in slots],
                control_guidance_end=[c.spec.ratio for c, _, _ in slots],
                control_guidance_start=[0.0] * len(slots))


def specs_from_flags(models: Sequence[str] | None, guides: Sequence[str] | None, weights: Sequence[float] | None,
                     ratios: Sequence[float] | None, types: Sequence[str] | None) -> list[ControlNetSpec]:
    """The `--control_net_*` flags as specs. Weights, ratios and types are per model (one value: for all);
    guide paths are per input (a union model with two types takes two), or one for all inputs."""
    models = list(models or [])
    if not models:
        for flag, values in (("--control_net_weights", weights), ("--control_net_ratios", ratios),
                             ("--control_net_types", types)):
            if values:
                raise UserError(f"{flag} is given but no --control_net_models")
        return []

    def per_model(values, default, flag):
        if not values:
            return [default] * len(models)
        if len(values) == 1:
            return list(values) * len(models)
        if len(values) != len(models):
            raise UserError(f"{flag}: expected 1 or {len(models)} values (one per --control_net_models), "
                            f"got {len(values)}")
        return list(values)

    type_lists = [tuple(t for t in (v or "").split(",") if t.strip()) for v in per_model(types, "", "--control_net_types")]
    inputs = [max(1, len(t)) for t in type_lists]
    guides = list(guides or [])
    if len(guides) not in (0, 1, sum(inputs)):
        raise UserError(f"--guide_image_path: expected 1 or {sum(inputs)} paths (one per ControlNet input), "
                        f"got {len(guides)}")
    specs, start = [], 0
    for path, weight, ratio, tl, n in zip(models, per_model(weights, 1.0, "--control_net_weights"),
                                          per_model(ratios, 1.0, "--control_net_ratios"), type_lists, inputs):
        own = tuple(guides[start:start + n]) if len(guides) > 1 else tuple(guides * n)
        specs.append(ControlNetSpec(path, own, float(weight), float(ratio), tl))
        start += n
    return specs


__all__ = ["ControlNetSpec", "FLUX_UNION_MODES", "LoadedControlNet", "SDXL_UNION_MODES", "build_flux_pipeline",
           "build_sdxl_pipeline", "check_specs", "flux_call_kwargs", "load_controlnet", "load_controlnets",
           "mode_index", "sdxl_call_kwargs", "specs_from_flags"]
