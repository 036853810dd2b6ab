"""SDXL: the family hooks of the shared loop (text encoding, size conditioning, the U-Net call, sampling)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch

from library.config.model_flags import ModelConfig
from library.device_copy import to_device
from library.errors import UserError
from library.families import noise as noise_lib
from library.families.interface import (FamilyModels, ModelFamily, NoisyInput, SampleRequest, TextOutputs,
                                        module_fingerprint)
from library.families.registry import register_family
from library.families.sdxl_text import TextOptions

if TYPE_CHECKING:  # annotations only
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from PIL import Image

    from library.config.train_config import RunConfig
    from library.config.training_flags import TrainingConfig
    from library.data.dataset import Batch
    from library.models.sdxl_loader import SDXLModels

SDXL_VAE_SCALE = 0.13025
DEFAULT_SAMPLER = "ddim"  # sd-scripts' default for generation and for sampling in training


@dataclass
class SDXLFamilyModels(FamilyModels):
    """SDXL's models: the U-Net as the denoiser, CLIP-L and CLIP-G (with their tokenizers), the VAE, and the run's
    caption options (`text_options`: --max_token_length / --weighted_captions; None: one 77-token sequence,
    unweighted), which change every text-encoder output and so its cache identity."""

    denoiser: UNet2DConditionModel
    vae: AutoencoderKL
    text_options: TextOptions | None = None

    @classmethod
    def from_loaded(cls, m: SDXLModels) -> SDXLFamilyModels:
        """The loader's six components (library/models/sdxl_loader.py) as the family hooks take them."""
        return cls(denoiser=m.unet, vae=m.vae, text_encoders=[m.text_encoder1, m.text_encoder2],
                   tokenizers=[m.tokenizer1, m.tokenizer2])


@register_family("sdxl")
class SDXLFamily(ModelFamily[SDXLFamilyModels]):
    """SDXL. The bound ModelConfig's --v_parameterization says whether the U-Net predicts v or the noise."""

    denoiser_key = "unet"

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__(config)
        self.alphas_cumprod = noise_lib.ddpm_alphas_cumprod()
        self._zero_snr: torch.Tensor | None = None
        self._schedule_on_device: dict[tuple[str, bool], torch.Tensor] = {}

    @property
    def v_prediction(self) -> bool:
        return bool(self.config.v_parameterization)

    # --- models -------------------------------------------------------------------------------------------------
    def load_models(self, dtype: torch.dtype) -> SDXLFamilyModels:
        from library.models.sdxl_loader import load_sdxl

        cfg = self.config
        models = SDXLFamilyModels.from_loaded(load_sdxl(cfg.pretrained_model_name_or_path, dtype=torch.float32,
                                                        tokenizer_cache_dir=cfg.tokenizer_cache_dir,
                                                        allow_pickle=cfg.allow_pickle))
        if cfg.vae:
            from library.models.sdxl_loader import load_sdxl_vae

            models.vae = load_sdxl_vae(cfg.vae, allow_pickle=cfg.allow_pickle)
        return models

    def set_text_options(self, models: SDXLFamilyModels, options: TextOptions | None) -> None:
        models.text_options = options

    def after_base_models_prepared(self, models: SDXLFamilyModels, cfg: RunConfig, device: torch.device) -> None:
        """--fp8_base / --fp8_base_unet (library/families/sdxl_placement.py), now that the weights have their device
        and compute dtype and before any network is attached."""
        from library.families.sdxl_placement import apply_sdxl_fp8

        apply_sdxl_fp8(models.denoiser, models.text_encoders, self.config.fp8_base, self.config.fp8_base_unet, device)

    def sharding_units(self, models: SDXLFamilyModels) -> list[torch.nn.Module]:
        unet = models.denoiser
        return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]

    def model_identity(self, models: SDXLFamilyModels, part: Literal["vae", "text"]) -> str:
        if part == "vae":
            return "sdxl-vae-" + module_fingerprint(models.vae)
        opts = models.text_options  # --max_token_length / --weighted_captions change every output
        tag = f"-{opts.tag}" if opts is not None and opts.tag else ""
        return "sdxl-te-" + "-".join(module_fingerprint(te) for te in models.text_encoders) + tag

    # --- encoders -----------------------------------------------------------------------------------------------
    def encode_text(self, models: SDXLFamilyModels, captions: list[str]) -> TextOutputs:
        te1, te2 = models.text_encoders
        tok1, tok2 = models.tokenizers
        opts = models.text_options
        if opts is not None and opts.tag:  # sd-scripts' 150/225-token pieces and/or (word:1.2) weights
            from library.families.sdxl_text import encode_captions

            return encode_captions(models.text_encoders, models.tokenizers, captions, opts)
        device = next(te1.parameters()).device
        ids1 = to_device(tok1(captions, padding="max_length", max_length=tok1.model_max_length, truncation=True,
                              return_tensors="pt").input_ids, device)
        ids2 = to_device(tok2(captions, padding="max_length", max_length=tok2.model_max_length, truncation=True,
                              return_tensors="pt").input_ids, device)
        out1 = te1(ids1, output_hidden_states=True)
        out2 = te2(ids2, output_hidden_states=True)
        # SDXL conditions on the penultimate layer of both encoders and on CLIP-G's pooled projection
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return {"encoder_hidden_states": hidden, "pooled": out2.text_embeds}

    def encode_images(self, models: SDXLFamilyModels, images: torch.Tensor,
                      generators: list[torch.Generator] | None = None) -> torch.Tensor:
        vae = models.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        if generators is None:
            latents = dist.sample()
        else:  # per-sample draws: the same latents however the batch is split across processes
            latents = dist.mean + dist.std * to_device(noise_lib.randn(tuple(dist.mean.shape), generators),
                                                       dist.mean.device, dist.mean.dtype, pin=True)
        return latents * getattr(vae.config, "scaling_factor", SDXL_VAE_SCALE)

    # --- noise and prediction -----------------------------------------------------------------------------------
    def training_alphas_cumprod(self, cfg: TrainingConfig, device: torch.device | None = None) -> torch.Tensor:
        """The training noise schedule: SDXL's, rescaled to zero terminal SNR with --zero_terminal_snr. On `device`,
        it is copied there once per run: the step's schedule lookups then never copy it from the host again."""
        zero_snr = bool(getattr(cfg, "zero_terminal_snr", False))
        if zero_snr and self._zero_snr is None:
            self._zero_snr = noise_lib.zero_terminal_snr_alphas_cumprod(self.alphas_cumprod)
        schedule = self._zero_snr if zero_snr and self._zero_snr is not None else self.alphas_cumprod
        if device is None:
            return schedule
        key = (str(device), zero_snr)
        if key not in self._schedule_on_device:
            self._schedule_on_device[key] = schedule.to(device)
        return self._schedule_on_device[key]

    def noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator],
                            cfg: TrainingConfig) -> NoisyInput:
        """sd-scripts' order of operations: noise (+ offset, + pyramid noise), timesteps, then the noisy input, which
        alone gets the --ip_noise_gamma perturbation. Draws that only a flag makes come after the default ones."""
        ac = self.training_alphas_cumprod(cfg, latents.device)
        noise = noise_lib.sample_noise(latents, generator, cfg.noise_offset,
                                       getattr(cfg, "adaptive_noise_scale", None),
                                       getattr(cfg, "noise_offset_random_strength", False))
        if getattr(cfg, "multires_noise_iterations", None):
            noise = noise_lib.pyramid_noise(noise, generator, cfg.multires_noise_iterations,
                                            cfg.multires_noise_discount)
        t = noise_lib.sample_timesteps(latents.shape[0], generator, cfg.min_timestep, cfg.max_timestep, latents.device)
        noised_with = noise_lib.perturbed_noise(noise, generator, getattr(cfg, "ip_noise_gamma", None),
                                                getattr(cfg, "ip_noise_gamma_random_strength", False))
        noisy = noise_lib.add_noise(latents, noised_with, t, ac)
        return NoisyInput(noisy=noisy, noise=noise, timesteps=t, extras={"alphas_cumprod": ac})

    def predict(self, models: SDXLFamilyModels, inp: NoisyInput, text: TextOutputs, batch: Batch) -> torch.Tensor:
        unet = models.denoiser
        time_ids = to_device(size_condition_ids(batch), inp.noisy.device, inp.noisy.dtype)
        added = {"text_embeds": text["pooled"].to(inp.noisy.dtype), "time_ids": time_ids}
        return unet(inp.noisy, inp.timesteps, text["encoder_hidden_states"].to(inp.noisy.dtype),
                    added_cond_kwargs=added).sample

    def loss_target(self, models: SDXLFamilyModels, latents: torch.Tensor, inp: NoisyInput) -> torch.Tensor:
        if self.v_prediction:
            ac = inp.extras.get("alphas_cumprod", self.alphas_cumprod)
            return noise_lib.v_target(latents, inp.noise, inp.timesteps, ac)
        return inp.noise

    def loss_weights(self, models: SDXLFamilyModels, inp: NoisyInput, cfg: TrainingConfig) -> torch.Tensor | None:
        """Per-sample loss factors, applied in sd-scripts' order: --min_snr_gamma, --scale_v_pred_loss_like_noise_pred,
        --v_pred_like_loss, --debiased_estimation_loss. None when none is on."""
        ac = inp.extras.get("alphas_cumprod", self.alphas_cumprod)
        v_pred = self.v_prediction
        weights: torch.Tensor | None = None

        def times(w: torch.Tensor) -> None:
            nonlocal weights
            weights = w if weights is None else weights * w

        if cfg.min_snr_gamma:
            times(noise_lib.min_snr_weights(inp.timesteps, ac, cfg.min_snr_gamma, v_pred))
        if getattr(cfg, "scale_v_pred_loss_like_noise_pred", False):
            times(noise_lib.v_pred_scale(inp.timesteps, ac))
        if getattr(cfg, "v_pred_like_loss", None):
            times(noise_lib.v_pred_like_weights(inp.timesteps, ac, cfg.v_pred_like_loss))
        if getattr(cfg, "debiased_estimation_loss", False):
            times(noise_lib.debiased_weights(inp.timesteps, ac, v_pred))
        return weights

    def huber_threshold(self, inp: NoisyInput, cfg: TrainingConfig) -> torch.Tensor | None:
        """The per-sample threshold of --loss_type huber / smooth_l1 (None for l1 / l2)."""
        from library.families.noise import huber_threshold

        if cfg.loss_type not in ("huber", "smooth_l1"):
            return None
        ac = inp.extras.get("alphas_cumprod", self.alphas_cumprod)
        return huber_threshold(cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, inp.timesteps, ac, len(ac))

    # --- sampling -----------------------------------------------------------------------------------------------
    def build_pipeline(self, models: SDXLFamilyModels, sampler: str | None = None,
                       edit: bool = False) -> StableDiffusionXLPipeline:
        from diffusers import StableDiffusionXLPipeline

        if edit:
            raise UserError("SDXL has no image-editing pipeline (FLUX.1 Kontext has); use --image_path for img2img")

        from library.prompts.samplers import make_scheduler

        te1, te2 = models.text_encoders
        tok1, tok2 = models.tokenizers
        scheduler = make_scheduler(sampler or DEFAULT_SAMPLER)
        pipe = StableDiffusionXLPipeline(vae=models.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=models.denoiser, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample_images(self, models: SDXLFamilyModels, prompts: list[SampleRequest], sampler: str,
                      before_generate: Callable[[SampleRequest], None] | None = None) -> list[Image.Image]:
        pipe = self.build_pipeline(models, sampler)
        images = []
        for req in prompts:
            if before_generate is not None:
                before_generate(req)
            gen = torch.Generator(device="cpu").manual_seed(req.seed)
            out = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt or None, width=req.width,
                       height=req.height, num_inference_steps=req.steps, guidance_scale=req.scale, generator=gen,
                       original_size=(req.height, req.width), target_size=(req.height, req.width))
            images.append(out.images[0])
        return images


def size_condition_ids(batch: Batch) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop top-left and target size, each (h, w), per sample."""
    rows = [list(o) + list(c) + list(t) for o, c, t in
            zip(batch.original_sizes, batch.crop_top_lefts, batch.target_sizes)]
    return torch.tensor(rows, dtype=torch.float32)

