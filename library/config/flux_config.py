"""FLUX-only training flags (sd-scripts' `flux_train_network.py` names) and their typed config.

The shared loop hands families `cfg.model` only; FLUX's flags travel inside it as `FluxModelConfig.flux`, built by
`flux_model_config` in the FLUX script.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from library.config.environment_flags import warn_once
from library.config.flags import add_flag_group, config_from_namespace, flag
from library.config.model_flags import ModelConfig
from library.errors import UserError

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")


@dataclass
class FluxConfig:
    """FLUX"""

    ae: str | None = flag(None, "FLUX autoencoder (ae.safetensors, BFL layout)")
    clip_l: str | None = flag(None, "CLIP-L text encoder (.safetensors, HF CLIPTextModel keys)")
    t5xxl: str | None = flag(None, "T5-XXL encoder (.safetensors, HF T5EncoderModel keys)")
    # None: 512 for guidance-distilled (dev), 256 otherwise (schnell)
    t5xxl_max_token_length: int | None = flag(None, "T5 tokens per caption (default 512 for dev, 256 for schnell)")
    apply_t5_attn_mask: bool = flag(False, "mask T5 padding in the encoder and the DiT")
    timestep_sampling: str = flag("sigma", "sigma: uniform over the shifted schedule; uniform; sigmoid (of a normal); "
                                           "shift (sigmoid, then --discrete_flow_shift); flux_shift (sigmoid, then "
                                           "FLUX's resolution-dependent shift)", choices=TIMESTEP_SAMPLING, type=str)
    sigmoid_scale: float = flag(1.0, "scale of the normal draw of sigmoid sampling")
    discrete_flow_shift: float = flag(3.0, "shift of the flow-matching schedule")
    model_prediction_type: str = flag("sigma_scaled", "how the model output is turned into the prediction compared "
                                                      "with noise - latents", choices=MODEL_PREDICTION_TYPES, type=str)
    weighting_scheme: str = flag("uniform", "SD3-style schemes: logit_normal and mode change how --timestep_sampling "
                                            "sigma draws its timesteps; sigma_sqrt and cosmap weight the loss by the "
                                            "noise level (with --model_prediction_type sigma_scaled); uniform / none: "
                                            "neither", choices=WEIGHTING_SCHEMES, type=str)
    logit_mean: float = flag(0.0, "mean of the normal draw of --weighting_scheme logit_normal")
    logit_std: float = flag(1.0, "standard deviation of the normal draw of --weighting_scheme logit_normal")
    mode_scale: float = flag(1.29, "scale of --weighting_scheme mode")
    guidance_scale: float = flag(3.5, "distilled guidance fed to guidance-distilled models (FLUX.1 dev) while "
                                      "training")
    # --fp8_base / --fp8_base_unet are declared with the model flags (library/config/model_flags.py: every trainer
    # has them); filled from them here: store the transformer's block Linears in fp8, upcast per layer
    fp8_base: bool = False
    fp8_base_unet: bool = False
    blocks_to_swap: int | None = flag(None, "keep this many transformer blocks on the CPU, moving each to the GPU "
                                            "while it runs (needs --gradient_checkpointing; without a CUDA GPU: a "
                                            "warning, and no swapping)")
    swap_prefetch: int = flag(1, "with --blocks_to_swap: blocks copied to the GPU ahead of the running one, on a "
                                 "side stream while it computes; each costs one more block of GPU memory")
    split_mode: bool = flag(False, "retired in sd-scripts (FLUX LoRA trained on split blocks); accepted with a "
                                   "warning, training runs without it")
    kontext: bool = flag(False, "paired training: the dataset's conditioning image is appended as extra image "
                                "tokens")
    kontext_degrade: str | None = flag(None, 'make the control image by degrading the target, e.g. '
                                             '"downsample=4,noise=0.05,blur=1.5,jpeg=30" (implies --kontext)')

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise UserError(f"--timestep_sampling {self.timestep_sampling!r}: expected one of {TIMESTEP_SAMPLING}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(f"--weighting_scheme {self.weighting_scheme!r}: expected one of {WEIGHTING_SCHEMES}")
        if self.model_prediction_type not in MODEL_PREDICTION_TYPES:
            raise UserError(f"--model_prediction_type {self.model_prediction_type!r}: expected one of "
                            f"{MODEL_PREDICTION_TYPES}")
        if self.t5xxl_max_token_length is not None and self.t5xxl_max_token_length < 1:
            raise UserError(f"--t5xxl_max_token_length must be positive, got {self.t5xxl_max_token_length}")
        if self.discrete_flow_shift <= 0:
            raise UserError(f"--discrete_flow_shift must be positive, got {self.discrete_flow_shift}")
        if self.kontext_degrade:
            from library.data.degrade import parse_degrade_spec

            parse_degrade_spec(self.kontext_degrade)  # fail at start-up, not at the first step
            self.kontext = True  # degradations only make sense as the control image of a paired (Kontext) run


@dataclass
class FluxModelConfig(ModelConfig):
    """The shared model flags plus FLUX's: what `FluxFamily.load_models` receives."""

    flux: FluxConfig = field(default_factory=FluxConfig)


def add_flux_args(p: argparse.ArgumentParser) -> None:
    add_flag_group(p, FluxConfig)


def flux_model_config(ns: argparse.Namespace) -> FluxModelConfig:
    """The model config of a FLUX run from the parsed flags; machine-only flags that cannot apply here are answered
    with a warning (see library.config.environment_flags) instead of stopping the run."""
    import torch

    values = dict(vars(ns))
    messages = []
    if values.get("fp8_base_unet"):
        values["fp8_base"] = True
    if values.get("split_mode"):
        messages.append("--split_mode: retired (sd-scripts removed it); the LoRA trains on the whole blocks")
    if values.get("blocks_to_swap") and not torch.cuda.is_available():
        messages.append(f"--blocks_to_swap {values['blocks_to_swap']}: no CUDA GPU on this machine, so no blocks are "
                        "swapped (the whole transformer stays on the CPU)")
        values["blocks_to_swap"] = None
    if values.get("loss_type") in ("huber", "smooth_l1") and values.get("huber_schedule") == "snr":
        raise UserError(f"--loss_type {values['loss_type']} with --huber_schedule snr (its default): the snr schedule "
                        "needs a DDPM noise schedule, which FLUX does not have (sd-scripts stops on it too); give "
                        "--huber_schedule constant or exponential")
    warn_once(messages)
    flux_ns = argparse.Namespace(**values)
    return config_from_namespace(FluxModelConfig, flux_ns, flux=config_from_namespace(FluxConfig, flux_ns))
