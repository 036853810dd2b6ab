"""FLUX's flow-matching timesteps: sd-scripts' --timestep_sampling methods, the discrete shift and FLUX's
resolution-dependent shift (mu), drawn per sample so that a sample's t does not depend on the batch split."""
from __future__ import annotations

import math

import torch

from library.config.flux_config import FluxConfig
from library.families import noise as noise_lib

FLOW_STEPS = 1000
# FLUX's resolution-dependent shift: mu grows linearly with the image-token count from 0.5 (256) to 1.15 (4096).
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    return (t * shift) / (1 + (shift - 1) * t)


def flux_mu(image_seq_len: int) -> float:
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return image_seq_len * m + (BASE_SHIFT - m * BASE_SEQ_LEN)


def sample_sigmas(batch: int, generators: torch.Generator | list[torch.Generator], fcfg: FluxConfig, image_seq_len: int) -> torch.Tensor:
    """t in (0, 1] per sample, by sd-scripts' --timestep_sampling methods; one generator per sample (or one for
    the batch), as the loop hands them out."""
    method = fcfg.timestep_sampling
    if method == "uniform":
        return noise_lib.rand(batch, generators)
    if method == "sigma":  # one of the 1000 steps of the shifted discrete schedule, by --weighting_scheme's density
        scheme = getattr(fcfg, "weighting_scheme", "uniform")
        if scheme in ("logit_normal", "mode"):
            u = timestep_density(batch, generators, scheme, fcfg.logit_mean, fcfg.logit_std, fcfg.mode_scale)
            idx = (u * FLOW_STEPS).long().clamp(0, FLOW_STEPS - 1).float()
        else:  # uniform over the steps
            idx = noise_lib.sample_timesteps(batch, generators, 0, FLOW_STEPS, torch.device("cpu")).float()
        return shift_sigmas((FLOW_STEPS - idx) / FLOW_STEPS, fcfg.discrete_flow_shift)
    t = torch.sigmoid(fcfg.sigmoid_scale * noise_lib.randn((batch,), generators))
    if method == "shift":
        return shift_sigmas(t, fcfg.discrete_flow_shift)
    if method == "flux_shift":
        mu = math.exp(flux_mu(image_seq_len))
        return mu / (mu + (1 / t.clamp(min=1e-6) - 1))
    return t  # sigmoid


def timestep_density(batch: int, generators: torch.Generator | list[torch.Generator], scheme: str, logit_mean: float, logit_std: float,
                     mode_scale: float) -> torch.Tensor:
    """u in [0, 1) per sample by SD3's timestep densities (sd-scripts' --weighting_scheme for --timestep_sampling
    sigma): logit_normal is sigmoid of a normal(logit_mean, logit_std) draw; mode maps a uniform u to
    1 - u - mode_scale * (cos(pi u / 2)^2 - 1 + u); any other scheme is uniform."""
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * noise_lib.randn((batch,), generators))
    u = noise_lib.rand(batch, generators)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """SD3's loss weighting by noise level (sd-scripts applies it with --model_prediction_type sigma_scaled):
    sigma_sqrt is 1 / sigma^2, cosmap is 2 / (pi (1 - 2 sigma + 2 sigma^2)); None for the schemes that weight
    uniformly."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return None
