"""FLUX-only training flags (sd-scripts' `flux_train_network.py` names) and their typed config.

The shared loop hands families `cfg.model` only; FLUX's flags travel inside it as `FluxModelConfig.flux`, built by
`flux_model_config` in the FLUX script.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from library.config.train_config import ModelConfig, from_namespace
from library.errors import UserError

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")


@dataclass
class FluxConfig:
    ae: str | None = None
    clip_l: str | None = None
    t5xxl: str | None = None
    t5xxl_max_token_length: int | None = None  # None: 512 for guidance-distilled (dev), 256 otherwise (schnell)
    apply_t5_attn_mask: bool = False
    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"
    guidance_scale: float = 3.5
    fp8_base: bool = False
    blocks_to_swap: int | None = None
    kontext: bool = False
    kontext_degrade: str | None = None

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise UserError(f"--timestep_sampling {self.timestep_sampling!r}: expected one of {TIMESTEP_SAMPLING}")
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
    g = p.add_argument_group("FLUX")
    g.add_argument("--ae", type=str, default=None, help="FLUX autoencoder (ae.safetensors, BFL layout)")
    g.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder (.safetensors, HF CLIPTextModel keys)")
    g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL encoder (.safetensors, HF T5EncoderModel keys)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None,
                   help="T5 tokens per caption (default 512 for dev, 256 for schnell)")
    g.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding in the encoder and the DiT")
    g.add_argument("--timestep_sampling", choices=TIMESTEP_SAMPLING, default="sigma",
                   help="sigma: uniform over the shifted schedule; uniform; sigmoid (of a normal); shift (sigmoid, "
                        "then --discrete_flow_shift); flux_shift (sigmoid, then FLUX's resolution-dependent shift)")
    g.add_argument("--sigmoid_scale", type=float, default=1.0, help="scale of the normal draw of sigmoid sampling")
    g.add_argument("--discrete_flow_shift", type=float, default=3.0, help="shift of the flow-matching schedule")
    g.add_argument("--model_prediction_type", choices=MODEL_PREDICTION_TYPES, default="sigma_scaled",
                   help="how the model output is turned into the prediction compared with noise - latents")
    g.add_argument("--guidance_scale", type=float, default=3.5,
                   help="distilled guidance fed to guidance-distilled models (FLUX.1 dev) while training")
    g.add_argument("--fp8_base", action="store_true",
                   help="store the transformer's block Linears in fp8 and upcast them per layer (halves their memory)")
    g.add_argument("--blocks_to_swap", type=int, default=None,
                   help="keep this many transformer blocks on the CPU, moving each to the GPU while it runs (CUDA "
                        "only; needs --gradient_checkpointing)")
    g.add_argument("--kontext", action="store_true",
                   help="paired training: the dataset's conditioning image is appended as extra image tokens")
    g.add_argument("--kontext_degrade", type=str, default=None,
                   help='make the control image by degrading the target, e.g. "downsample=4,noise=0.05,blur=1.5,'
                        'jpeg=30" (implies --kontext)')


def flux_model_config(ns: argparse.Namespace) -> FluxModelConfig:
    """The model config of a FLUX run from the parsed flags."""
    return from_namespace(FluxModelConfig, ns, flux=from_namespace(FluxConfig, ns))
