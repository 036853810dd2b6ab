"""FLUX.1: the family hooks of the shared loop (flow matching on 2x2-packed latents, T5 + CLIP-L, Kontext pairs).

Training follows sd-scripts' `flux_train_network.py`: latents are noised along the straight path
`x_t = (1 - t) x_0 + t noise`, the transformer is asked for the velocity `noise - x_0`, timesteps come from one of
sd-scripts' samplers, and guidance-distilled models (dev) get `--guidance_scale` as their guidance input.

Paired (Kontext-style) mode: the control image's latents are packed and appended after the target's tokens, with
position ids whose first index is 1 (FLUX.1 Kontext's convention), and only the target tokens' output is kept, so
the loss never sees the control tokens.

The family is bound to its FluxModelConfig when built (`get_family("flux", config)`); the FLUX flags are read from
`self.flux`, the one place they are stored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch

from library.config.flux_config import FluxConfig, FluxModelConfig
from library.config.model_flags import ModelConfig
from library.device_copy import to_device
from library.errors import UserError
from library.families import noise as noise_lib
from library.families.flux_latents import KONTEXT_CONTROL_INDEX, image_ids, pack_latents, unpack_latents
from library.families.flux_placement import apply_low_vram, check_low_vram_flags
from library.families.flux_sigmas import FLOW_STEPS, loss_weighting, sample_sigmas
from library.families.interface import (FamilyModels, ModelFamily, NoisyInput, SampleRequest, TextOutputs,
                                        module_fingerprint)
from library.families.registry import register_family

if TYPE_CHECKING:  # annotations only
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from PIL import Image

    from library.config.train_config import RunConfig
    from library.config.training_flags import TrainingConfig
    from library.data.dataset import Batch
    from library.models.flux_loader import FluxModels

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77

# DDPM-only flags that sd-scripts' FLUX trainer accepts and does not use: each is answered with one warning.
DDPM_ONLY_FLAGS = ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength", "multires_noise_iterations",
                   "zero_terminal_snr", "min_snr_gamma", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss",
                   "debiased_estimation_loss")


def unused_ddpm_flags(cfg: TrainingConfig) -> list[str]:
    """The DDPM-only flags (see DDPM_ONLY_FLAGS) a FLUX run was given."""
    return [f"--{name}" for name in DDPM_ONLY_FLAGS if getattr(cfg, name, None)]


def t5_max_length(transformer: FluxTransformer2DModel, t5xxl_max_token_length: int | None) -> int:
    """--t5xxl_max_token_length, else sd-scripts' default: 512 for guidance-distilled models (dev), 256 (schnell)."""
    return t5xxl_max_token_length or (512 if transformer.config.guidance_embeds else 256)


@dataclass
class FluxFamilyModels(FamilyModels):
    """FLUX's models: the transformer as the denoiser, the AE as the VAE, CLIP-L and T5 (with their tokenizers),
    and the T5 sequence length the captions are encoded to (`t5_max_length`; it depends on the loaded transformer,
    see `t5_max_length`)."""

    denoiser: FluxTransformer2DModel
    vae: AutoencoderKL
    t5_max_length: int = 256

    @classmethod
    def from_loaded(cls, m: FluxModels, t5xxl_max_token_length: int | None) -> FluxFamilyModels:
        """The loader's components (library/models/flux_loader.py) as the family hooks take them."""
        return cls(denoiser=m.transformer, vae=m.ae, text_encoders=[m.clip_l, m.t5],
                   tokenizers=[m.tokenizer_clip, m.tokenizer_t5],
                   t5_max_length=t5_max_length(m.transformer, t5xxl_max_token_length))


# ----------------------------------------------------------------------------------------------------------------
@register_family("flux")
class FluxFamily(ModelFamily[FluxFamilyModels]):
    denoiser_key = "transformer"
    # CLIP-L gives the pooled vector, T5 the sequence (and its mask): with a CLIP-L LoRA and
    # --cache_text_encoder_outputs only T5's outputs are cached, as sd-scripts' partial caching does
    text_outputs_by_encoder = (("pooled",), ("t5", "t5_mask"))

    def __init__(self, config: ModelConfig | None = None) -> None:
        if config is not None and not isinstance(config, FluxModelConfig):
            raise TypeError(f"the FLUX family is built with a FluxModelConfig, got {type(config).__name__}")
        super().__init__(config if config is not None else FluxModelConfig())
        self.config: FluxModelConfig
        self.flux: FluxConfig = self.config.flux  # the FLUX flags, stored once
        self._degrade_spec = None
        if self.flux.kontext_degrade:
            from library.data.degrade import parse_degrade_spec

            self._degrade_spec = parse_degrade_spec(self.flux.kontext_degrade)

    # --- models -------------------------------------------------------------------------------------------------
    def load_models(self, dtype: torch.dtype) -> FluxFamilyModels:
        """Load the models of the bound config."""
        from library.models.flux_loader import load_flux

        check_low_vram_flags(self.flux.blocks_to_swap, "train")
        return FluxFamilyModels.from_loaded(load_flux(self.config, torch.float32), self.flux.t5xxl_max_token_length)

    def modules_kept_off_device(self, models: FluxFamilyModels, cfg: RunConfig) -> list[torch.nn.Module]:
        from library.models.lowvram import swapped_blocks

        fcfg = self.flux
        if not fcfg.blocks_to_swap:
            return []
        return swapped_blocks(models.denoiser, fcfg.blocks_to_swap)

    def sharding_units(self, models: FluxFamilyModels) -> list[torch.nn.Module]:
        from library.models.lowvram import model_blocks

        return model_blocks(models.denoiser)

    def after_base_models_prepared(self, models: FluxFamilyModels, cfg: RunConfig, device: torch.device) -> None:
        fcfg = self.flux
        models.block_swapper = apply_low_vram(models.denoiser, fcfg, device, bool(cfg.training.gradient_checkpointing))

    def model_identity(self, models: FluxFamilyModels, part: Literal["vae", "text"]) -> str:
        if part == "vae":
            return "flux-ae-" + module_fingerprint(models.vae)
        fcfg = self.flux
        encoders = "-".join(module_fingerprint(te) for te in models.text_encoders)
        return f"flux-te-{encoders}-t5len{models.t5_max_length}-mask{int(fcfg.apply_t5_attn_mask)}"

    # --- encoders -----------------------------------------------------------------------------------------------
    def encode_text(self, models: FluxFamilyModels, captions: list[str]) -> TextOutputs:
        return self.encode_text_part(models, captions, (0, 1))

    def encode_text_part(self, models: FluxFamilyModels, captions: list[str],
                         encoders: tuple[int, ...]) -> TextOutputs:
        """CLIP-L (0) -> "pooled"; T5 (1) -> "t5", "t5_mask". Each runs on the device its weights are on (a partial
        cache leaves T5 on the CPU and CLIP-L on the device)."""
        out: TextOutputs = {}
        if 0 in encoders:
            out["pooled"] = self._encode_clip(models, captions)
        if 1 in encoders:
            out.update(self._encode_t5(models, captions))
        return out

    def _encode_clip(self, models: FluxFamilyModels, captions: list[str]) -> torch.Tensor:
        clip, tok_clip = models.text_encoders[0], models.tokenizers[0]
        ids = to_device(tok_clip(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                                 return_tensors="pt").input_ids, next(clip.parameters()).device)
        return clip(ids, output_hidden_states=False).pooler_output

    def _encode_t5(self, models: FluxFamilyModels, captions: list[str]) -> TextOutputs:
        t5, tok_t5 = models.text_encoders[1], models.tokenizers[1]
        fcfg = self.flux
        device = next(t5.parameters()).device
        tok = tok_t5(captions, padding="max_length", max_length=models.t5_max_length, truncation=True,
                     return_tensors="pt")
        t5_ids, mask = to_device(tok.input_ids, device), to_device(tok.attention_mask, device)
        hidden = t5(t5_ids, attention_mask=mask if fcfg.apply_t5_attn_mask else None).last_hidden_state
        if fcfg.apply_t5_attn_mask:
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return {"t5": hidden, "t5_mask": mask.to(hidden.dtype)}

    def text_encoders_trained(self, models: FluxFamilyModels, network: torch.nn.Module,
                              trains_text_encoder: bool) -> list[bool]:
        """CLIP-L whenever the network trains text encoders; T5 only when the network says `train_t5xxl` (the
        attribute sd-scripts' flux_train_network.py reads; networks.lora_flux sets it from --network_args)."""
        return [trains_text_encoder, trains_text_encoder and bool(getattr(network, "train_t5xxl", False))]

    def encode_images(self, models: FluxFamilyModels, images: torch.Tensor,
                      generators: list[torch.Generator] | None = None, sample: bool = True) -> torch.Tensor:
        """Pixels in [-1, 1] -> FLUX latents: (z - shift) * scale. With per-sample `generators` the posterior
        sample does not depend on how a batch is split across processes."""
        ae = models.vae
        dist = ae.encode(images.to(ae.device, ae.dtype)).latent_dist
        if not sample:
            z = dist.mode()
        elif generators is not None:
            z = dist.mean + dist.std * to_device(noise_lib.randn(tuple(dist.mean.shape), generators), dist.mean.device,
                                                 dist.mean.dtype, pin=True)
        else:
            z = dist.sample()
        return (z - ae.config.shift_factor) * ae.config.scaling_factor

    # --- noise and prediction -----------------------------------------------------------------------------------
    def noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator],
                            cfg: TrainingConfig) -> NoisyInput:
        """Plain Gaussian noise, as sd-scripts' FLUX trainer draws it (--noise_offset and the other DDPM noise flags
        are answered with a warning and not used); --ip_noise_gamma perturbs the noisy input only."""
        self._warn_unused(cfg)
        noise = noise_lib.sample_noise(latents, generator, None)
        seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        t = to_device(sample_sigmas(latents.shape[0], generator, self.flux, seq_len), latents.device)
        tb = t.view(-1, 1, 1, 1).to(latents.dtype)
        noised_with = noise_lib.perturbed_noise(noise, generator, getattr(cfg, "ip_noise_gamma", None),
                                                getattr(cfg, "ip_noise_gamma_random_strength", False))
        noisy = (1 - tb) * latents + tb * noised_with
        # drawn last, so that --kontext_degrade leaves noise and timesteps unchanged; one seed per sample
        seeds = noise_lib.sample_timesteps(latents.shape[0], generator, 0, 2 ** 31 - 1, torch.device("cpu"))
        return NoisyInput(noisy=noisy, noise=noise, timesteps=t, extras={"degrade_seeds": seeds})

    def control_latents(self, models: FluxFamilyModels, batch: Batch, inp: NoisyInput) -> torch.Tensor:
        """Latents of the paired control image: the dataset's conditioning image, or the degraded target."""
        if self._degrade_spec is not None:
            from library.data.degrade import degrade

            if batch.images is None:
                raise UserError("--kontext_degrade makes control images from the training images, so it cannot "
                                "run on cached latents: drop --cache_latents / --cache_latents_to_disk")
            clean = ((batch.images.float().cpu() + 1) / 2).clamp(0, 1)
            drawn = inp.extras.get("degrade_seeds")
            seeds = drawn.tolist() if drawn is not None and drawn.numel() else [0] * clean.shape[0]
            pixels = torch.cat([degrade(img[None], self._degrade_spec, torch.Generator().manual_seed(int(seed)))
                                for img, seed in zip(clean, seeds)])
        else:
            if batch.conditioning_images is None:
                raise UserError("--kontext needs paired data: set conditioning_data_dir in the dataset config's "
                                "subsets (control image per target), or give --kontext_degrade")
            pixels = batch.conditioning_images.float()
        with torch.no_grad():
            return self.encode_images(models, pixels * 2 - 1, sample=False).to(inp.noisy.dtype)

    def predict(self, models: FluxFamilyModels, inp: NoisyInput, text: TextOutputs, batch: Batch) -> torch.Tensor:
        tr = models.denoiser
        fcfg = self.flux
        noisy = inp.noisy
        b, _, h, w = noisy.shape
        device, dtype = noisy.device, noisy.dtype
        tokens = pack_latents(noisy)
        ids = image_ids(h, w, device, dtype)
        n_target = tokens.shape[1]
        if fcfg.kontext:
            ctrl = self.control_latents(models, batch, inp)
            tokens = torch.cat([tokens, pack_latents(ctrl)], dim=1)
            ids = torch.cat([ids, image_ids(ctrl.shape[-2], ctrl.shape[-1], device, dtype, KONTEXT_CONTROL_INDEX)])
        t5 = text["t5"].to(device, dtype)
        guidance = torch.full((b,), fcfg.guidance_scale, device=device, dtype=dtype) \
            if tr.config.guidance_embeds else None
        attention = None
        if fcfg.apply_t5_attn_mask:
            keep = torch.cat([text["t5_mask"].to(device).bool(),
                              torch.ones(b, tokens.shape[1], dtype=torch.bool, device=device)], dim=1)
            attention = {"attention_mask": keep[:, None, None, :]}
        out = tr(hidden_states=tokens, encoder_hidden_states=t5, pooled_projections=text["pooled"].to(device, dtype),
                 timestep=inp.timesteps.to(device, dtype), img_ids=ids,
                 txt_ids=torch.zeros(t5.shape[1], 3, device=device, dtype=dtype), guidance=guidance,
                 joint_attention_kwargs=attention).sample
        pred = unpack_latents(out[:, :n_target], h, w)  # target tokens only: the loss never sees the control
        if fcfg.model_prediction_type == "additive":
            pred = pred + noisy
        elif fcfg.model_prediction_type == "sigma_scaled":
            pred = pred * (-inp.timesteps.view(-1, 1, 1, 1).to(dtype)) + noisy
        return pred

    def loss_target(self, models: FluxFamilyModels, latents: torch.Tensor, inp: NoisyInput) -> torch.Tensor:
        return inp.noise - latents

    def _warn_unused(self, cfg: TrainingConfig) -> None:
        """One warning per process for the DDPM-only flags a FLUX run was given (warn_once keeps it to one)."""
        unused = unused_ddpm_flags(cfg)
        if unused:
            from library.config.environment_flags import warn_once

            warn_once([f"{', '.join(unused)}: for DDPM (epsilon / v) models; FLUX training does not use "
                       f"{'it' if len(unused) == 1 else 'them'} (as in sd-scripts' flux_train_network.py)"])

    def loss_weights(self, models: FluxFamilyModels, inp: NoisyInput, cfg: TrainingConfig) -> torch.Tensor | None:
        """--weighting_scheme sigma_sqrt / cosmap, with --model_prediction_type sigma_scaled as in sd-scripts."""
        self._warn_unused(cfg)
        fcfg = self.flux
        if fcfg.model_prediction_type != "sigma_scaled":
            return None
        return loss_weighting(fcfg.weighting_scheme, inp.timesteps)

    def huber_threshold(self, inp: NoisyInput, cfg: TrainingConfig) -> torch.Tensor | None:
        """--loss_type huber / smooth_l1 on FLUX: sd-scripts' threshold at timestep 1000 * sigma (constant and
        exponential schedules; 'snr' needs a DDPM schedule, which check_training_flags refuses up front)."""
        from library.families.noise import huber_threshold

        if cfg.loss_type not in ("huber", "smooth_l1"):
            return None
        return huber_threshold(cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, inp.timesteps.float() * FLOW_STEPS,
                               None, FLOW_STEPS)

    # --- sampling -----------------------------------------------------------------------------------------------
    def build_pipeline(self, models: FluxFamilyModels, sampler: str | None = None,
                       edit: bool = False) -> FluxPipeline:
        """FLUX samples with its flow-matching Euler sampler only (`sampler` is not used); `edit` gives the Kontext
        pipeline."""
        from diffusers import FluxKontextPipeline, FluxPipeline

        from library.models.tiny_flux import flux_scheduler

        clip, t5 = models.text_encoders
        tok_clip, tok_t5 = models.tokenizers
        cls = FluxKontextPipeline if edit else FluxPipeline
        pipe = cls(scheduler=flux_scheduler(), vae=models.vae, text_encoder=clip, tokenizer=tok_clip,
                   text_encoder_2=t5, tokenizer_2=tok_t5, transformer=models.denoiser)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample_images(self, models: FluxFamilyModels, prompts: list[SampleRequest], sampler: str,
                      before_generate: Callable[[SampleRequest], None] | None = None) -> list[Image.Image]:
        """FLUX samples with its flow-matching Euler sampler (the sampler name is not used); `scale` is the
        distilled guidance. A prompt with a control image (`--cn path`) is generated Kontext-style from it."""
        from PIL import Image

        pipes: dict[bool, FluxPipeline] = {}
        images = []
        max_len = min(512, models.t5_max_length)
        for req in prompts:
            if before_generate is not None:
                before_generate(req)
            control = req.control_image
            kontext = bool(control)
            pipe = pipes.get(kontext) or pipes.setdefault(kontext, self.build_pipeline(models, edit=kontext))
            gen = torch.Generator(device="cpu").manual_seed(req.seed)
            kwargs = dict(prompt=req.prompt, width=req.width, height=req.height, num_inference_steps=req.steps,
                          guidance_scale=req.guidance_scale if req.guidance_scale is not None else req.scale,  # --g wins
                          generator=gen, max_sequence_length=max_len)
            if kontext:
                kwargs.update(image=Image.open(control).convert("RGB"), _auto_resize=False,
                              max_area=req.width * req.height)
            images.append(pipe(**kwargs).images[0])
        return images
