"""Noise, timesteps and loss weights of DDPM-style (epsilon / v) training."""
from __future__ import annotations

import torch


def ddpm_alphas_cumprod(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD/SDXL's scaled-linear schedule."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


Generators = "torch.Generator | list[torch.Generator]"


def _per_sample(draw, batch: int, generators) -> torch.Tensor:
    """One generator per sample makes a sample's noise independent of how the batch is split across processes."""
    if isinstance(generators, torch.Generator):
        return draw(batch, generators)
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for a batch of {batch}")
    return torch.cat([draw(1, g) for g in generators])


def randn(shape: tuple[int, ...], generators) -> torch.Tensor:
    return _per_sample(lambda b, g: torch.randn((b, *shape[1:]), generator=g), shape[0], generators)


def rand(batch: int, generators) -> torch.Tensor:
    return _per_sample(lambda b, g: torch.rand((b,), generator=g), batch, generators)


def sample_noise(latents: torch.Tensor, generators, noise_offset: float | None) -> torch.Tensor:
    noise = randn(tuple(latents.shape), generators).to(latents.device, latents.dtype)
    if noise_offset:
        # the offset noise trick: a per-channel constant lets the model learn very dark / bright images
        offset = randn((latents.shape[0], latents.shape[1], 1, 1), generators)
        noise = noise + noise_offset * offset.to(latents.device, latents.dtype)
    return noise


def sample_timesteps(batch: int, generators, min_t: int, max_t: int, device: torch.device) -> torch.Tensor:
    return _per_sample(lambda b, g: torch.randint(min_t, max_t, (b,), generator=g), batch, generators).to(device)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(latents.device)[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def v_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(latents.device)[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): weight = min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr
