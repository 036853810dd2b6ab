"""sd-scripts flags that name models these trainers do not train (SD 2.x, Chroma) or that another sd-scripts script
uses; accepted so that configs parse, and answered with a clear error (a model that cannot train here) or one warning
(a flag sd-scripts itself ignores in this script)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from library.config.flags import flag
from library.errors import UserError


@dataclass
class ModelGenerationFlags:
    """model generation (SD 2.x is not SDXL / FLUX)"""

    v2: bool = flag(False, "sd-scripts: load a Stable Diffusion 2.x model. SD 2.x models are neither SDXL nor FLUX: "
                           "the SDXL trainers refuse it with an error (as sd-scripts' do); the FLUX trainer ignores "
                           "it with a warning (as sd-scripts' does)")


@dataclass
class FluxVariantFlags:
    """FLUX model variant"""

    model_type: str = flag("flux", "the model type to train: flux (FLUX.1 dev/schnell) or chroma (not supported "
                                   "here: an error says so)", choices=("flux", "chroma"))
    controlnet_model_name_or_path: str | None = flag(None, "sd-scripts: a FLUX ControlNet file, read by "
                                                           "flux_train_control_net.py only; flux_train_network "
                                                           "ignores it (a warning says so)")


def check_model_generation(values: Mapping[str, object], family: str) -> None:
    """--v2 (SDXL trainers) and --model_type values that name a model this trainer cannot train."""
    if values.get("v2") and family != "flux":
        raise UserError("--v2: Stable Diffusion 2.x models are not SDXL models and this trainer trains SDXL only "
                        "(sd-scripts' SDXL trainers refuse --v2 too). Drop --v2, or train SD 2.x models with "
                        "sd-scripts' train_network.py")
    model_type = values.get("model_type", "flux")
    if model_type != "flux":
        raise UserError(f"--model_type {model_type}: only FLUX.1 models (--model_type flux) train here; "
                        f"{model_type} models are not supported by this toolkit")


def compat_warnings(values: Mapping[str, object], family: str) -> list[str]:
    """Flags sd-scripts accepts and ignores in this script: one line each."""
    out = []
    if values.get("v2") and family == "flux":
        out.append("--v2: an SD 2.x flag; FLUX.1 models are not SD 2.x, so it is ignored (as in sd-scripts' "
                   "flux_train_network.py) and the FLUX model is trained as usual")
    if values.get("controlnet_model_name_or_path"):
        out.append("--controlnet_model_name_or_path: only sd-scripts' flux_train_control_net.py reads it; "
                   "flux_train_network trains the LoRA without a ControlNet (as sd-scripts' does)")
    return out
