"""FLUX's flow-matching timesteps: sd-scripts' --timestep_sampling methods, the discrete shift and FLUX's
resolution-dependent shift (mu), drawn per sample so that a sample's t does not depend on the batch split."""
from __future__ import annotations

import math
from typing import Any

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


def sample_sigmas(batch: int, generators: Any, fcfg: FluxConfig, image_seq_len: int) -> torch.Tensor:
    """t in (0, 1] per sample, by sd-scripts' --timestep_sampling methods; one generator per sample (or one for
    the batch), as the loop hands them out."""
    method = fcfg.timestep_sampling
    if method == "uniform":
        return noise_lib.rand(batch, generators)
    if method == "sigma":  # uniform over the 1000 steps of the shifted discrete schedule
        idx = noise_lib.sample_timesteps(batch, generators, 0, FLOW_STEPS, torch.device("cpu")).float()
        return shift_sigmas((FLOW_STEPS - idx) / FLOW_STEPS, fcfg.discrete_flow_shift)
    t = torch.sigmoid(fcfg.sigmoid_scale * noise_lib.randn((batch,), generators))
    if method == "shift":
        return shift_sigmas(t, fcfg.discrete_flow_shift)
    if method == "flux_shift":
        mu = math.exp(flux_mu(image_seq_len))
        return mu / (mu + (1 / t.clamp(min=1e-6) - 1))
    return t  # sigmoid
