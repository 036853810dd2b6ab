"""Noise, timesteps and loss weights of DDPM-style (epsilon / v) training.

The sd-scripts noise and loss flags (`--noise_offset` with `--adaptive_noise_scale` / `--noise_offset_random_strength`,
`--multires_noise_*`, `--ip_noise_gamma*`, `--zero_terminal_snr`, and the SNR-based loss weights) are defined here as
sd-scripts defines them, with one difference on purpose: every random draw comes from the sample's own generator
(one per position of the global batch), so that a sample's noise does not depend on how the batch is split across
processes or on where a run was resumed. Where sd-scripts draws one value for the whole batch (the random offset and
perturbation strengths, pyramid noise's level ratios), this module draws one per sample, and pyramid noise is
normalised per sample instead of over the batch.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from library.device_copy import to_device


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


def sample_noise(latents: torch.Tensor, generators, noise_offset: float | None,
                 adaptive_noise_scale: float | None = None, random_strength: bool = False) -> torch.Tensor:
    """Gaussian noise like `latents`, plus sd-scripts' offset noise when `noise_offset` is set: a per-channel
    constant lets the model learn very dark / bright images. `random_strength` (--noise_offset_random_strength)
    draws the offset's strength uniformly in [0, noise_offset); `adaptive_noise_scale` adds that much of each
    channel's absolute latent mean to it (clamped at 0 from below)."""
    noise = to_device(randn(tuple(latents.shape), generators), latents.device, latents.dtype, pin=True)
    if noise_offset:
        b = latents.shape[0]
        strength: Any = noise_offset
        if random_strength:
            strength = to_device(rand(b, generators) * noise_offset, latents.device, latents.dtype).view(b, 1, 1, 1)
        if adaptive_noise_scale is not None:
            channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
            strength = torch.clamp(strength + adaptive_noise_scale * channel_mean, min=0.0)
        offset = randn((b, latents.shape[1], 1, 1), generators)
        noise = noise + strength * to_device(offset, latents.device, latents.dtype)
    return noise


def pyramid_noise(noise: torch.Tensor, generators, iterations: int, discount: float) -> torch.Tensor:
    """sd-scripts' multi-resolution ("pyramid") noise (--multires_noise_iterations / --multires_noise_discount):
    level i adds Gaussian noise drawn at 1/r**i of the resolution (r uniform in [2, 4) per level), upscaled
    bilinearly and weighted discount**i, until a side reaches one pixel; the sum is divided by its standard
    deviation. Per sample (own generator, own r, own normalisation), see the module docstring."""
    gens = [generators] * noise.shape[0] if isinstance(generators, torch.Generator) else list(generators)
    if len(gens) != noise.shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {noise.shape[0]}")
    _, c, h, w = noise.shape
    out = []
    for sample, g in zip(noise, gens):
        x = sample.unsqueeze(0).float()
        for i in range(iterations):
            r = float(torch.rand((), generator=g)) * 2 + 2
            hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
            level = to_device(torch.randn((1, c, hn, wn), generator=g), x.device)
            x = x + F.interpolate(level, size=(h, w), mode="bilinear") * discount ** i
            if hn == 1 or wn == 1:
                break
        out.append(x / x.std())
    return torch.cat(out).to(noise.dtype)


def perturbation_strength(batch: int, generators, gamma: float, random_strength: bool) -> torch.Tensor:
    """--ip_noise_gamma's per-sample strength: gamma, or uniform in [0, gamma) with --ip_noise_gamma_random_strength."""
    if random_strength:
        return rand(batch, generators) * gamma
    return torch.full((batch,), float(gamma))


def perturbed_noise(noise: torch.Tensor, generators, gamma: float | None, random_strength: bool) -> torch.Tensor:
    """The noise that goes into the noisy input under --ip_noise_gamma (the loss target keeps `noise`): noise plus a
    per-sample-scaled second draw. Without gamma, `noise` itself and no draw, so runs without the flag are unchanged."""
    if not gamma:
        return noise
    b = noise.shape[0]
    strength = perturbation_strength(b, generators, gamma, random_strength)
    extra = to_device(randn(tuple(noise.shape), generators), noise.device, noise.dtype, pin=True)
    return noise + to_device(strength, noise.device, noise.dtype).view(b, 1, 1, 1) * extra


def sample_timesteps(batch: int, generators, min_t: int, max_t: int, device: torch.device) -> torch.Tensor:
    """Integer timesteps uniform in [min_t, max_t); min_t == max_t trains every sample at that one timestep, as
    sd-scripts does (no draw is made then)."""
    if min_t > max_t:
        raise ValueError(f"--min_timestep {min_t} is above --max_timestep {max_t}")
    if min_t == max_t:
        return torch.full((batch,), int(max_t), dtype=torch.long, device=device)
    return to_device(_per_sample(lambda b, g: torch.randint(min_t, max_t, (b,), generator=g), batch, generators),
                     device)


def zero_terminal_snr_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """--zero_terminal_snr (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): shift
    and scale sqrt(alpha_bar) so that it keeps its first value and reaches exactly 0 at the last timestep, the
    schedule sd-scripts builds from the rescaled betas."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return (root ** 2).to(alphas_cumprod.dtype)


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """alpha_bar / (1 - alpha_bar) at each timestep (inf at a zero-noise step, 0 at a zero-terminal-SNR end)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


SNR_CAP = 1000.0  # sd-scripts caps the SNR at 1000 in the scaled / debiased weights (t=0 would be nearly inf)


def v_pred_scale(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR/(SNR+1), the SNR capped at 1000: --scale_v_pred_loss_like_noise_pred's factor."""
    s = torch.clamp(snr(timesteps, alphas_cumprod), max=SNR_CAP)
    return s / (s + 1)


def v_pred_like_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, amount: float) -> torch.Tensor:
    """--v_pred_like_loss: loss + amount * loss / (SNR/(SNR+1)), as a factor on the loss."""
    return 1 + amount / v_pred_scale(timesteps, alphas_cumprod)


def debiased_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """--debiased_estimation_loss: 1/sqrt(SNR) for noise prediction, 1/(SNR+1) for v-prediction (SNR capped at
    1000)."""
    s = torch.clamp(snr(timesteps, alphas_cumprod), max=SNR_CAP)
    return 1 / (s + 1) if v_prediction else 1 / torch.sqrt(s)


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


HUBER_SCHEDULES = ("constant", "exponential", "snr")


def huber_threshold(schedule: str, huber_c: float, huber_scale: float, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor | None = None, num_train_timesteps: int = 1000) -> torch.Tensor:
    """sd-scripts' per-sample Huber threshold (`--huber_schedule`, `--huber_c`, `--huber_scale`), for integer DDPM
    timesteps in [0, num_train_timesteps):
    - constant: huber_c * huber_scale;
    - exponential: huber_scale * huber_c ** (t / num_train_timesteps), from huber_scale at t=0 down to
      huber_c * huber_scale at the last timestep;
    - snr: huber_c + (1 - huber_c) / (1 + sigma_t) ** 2 with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), near 1
      for clean inputs and near huber_c for pure noise (huber_scale does not enter, as in sd-scripts)."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t / num_train_timesteps) * huber_scale
    if schedule == "snr":
        if alphas_cumprod is None:
            raise ValueError("the 'snr' Huber schedule needs the noise schedule's alphas_cumprod")
        ac = alphas_cumprod.to(t.device)[timesteps.long()]
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown Huber schedule {schedule!r}; expected one of {HUBER_SCHEDULES}")
