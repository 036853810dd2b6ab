"""Noise, timesteps and loss weights of DDPM-style (epsilon / v) training."""
from __future__ import annotations

import torch


def ddpm_alphas_cumprod(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD/SDXL's scaled-linear schedule."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float | None) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if noise_offset:
        # the offset noise trick: a per-channel constant lets the model learn very dark / bright images
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + noise_offset * offset.to(latents.device, latents.dtype)
    return noise


def sample_timesteps(batch: int, generator: torch.Generator, min_t: int, max_t: int, device: torch.device) -> torch.Tensor:
    return torch.randint(min_t, max_t, (batch,), generator=generator).to(device)


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
