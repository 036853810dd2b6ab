"""SDXL batch generation (`sdxl_gen_img.py`): text-to-image, img2img, ControlNet-LLLite and ControlNets on the
shared planning, networks, progress and saving of `library.sample.generation`; the pipeline is
`SDXLFamily.build_pipeline`. Latents are decoded in --vae_batch_size chunks.
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from library.errors import ModelLoadError, UserError
from library.families.sdxl import SDXLFamily, SDXLFamilyModels
from library.prompts.samplers import canonical_sampler_name
from library.sample.controlnets import build_sdxl_pipeline, check_specs, load_controlnets, sdxl_call_kwargs
from library.sample.highres_fix import HighresFix, upscale_latents
from library.sample.long_prompt import encode_sdxl_prompts
from library.sample.negative_scale import empty_prompt_embeds
from library.sample.unet_options import check_unet_options, unet_options
from library.sample.inpaint import InpaintMasks, inpaint_pipeline
from library.sample.regional_mask import attach_regions, check_regional
from library.sample.textual_inversion import TokenExpander, load_textual_inversion
from library.sample.generation import (
    DTYPES, SEED_RANGE, AttachedNetworks, GenerationConfig, ImageProgress, ImageRequest, check_common,
    controlnet_images, images_to_tensor, initial_noise, load_rgb, load_wildcards, make_batches, move_model,
    plan_requests, resolve_device, save_request_png, where_in_prompts,
)

logger = logging.getLogger(__name__)


def check_config(config: GenerationConfig) -> None:
    """Reject option combinations that cannot work, before any model is loaded."""
    check_common(config)
    check_control(config)
    check_unet_options(config)
    check_regional(config)
    for path in config.textual_inversion_embeddings:
        if not os.path.isfile(path):
            raise UserError(f"--textual_inversion_embeddings '{path}': no such file")
    if config.vae and not os.path.exists(config.vae):
        raise ModelLoadError(f"--vae '{config.vae}': no such file or folder")
    if config.interactive and config.prompts:
        raise UserError("--interactive reads the prompts from stdin: drop --prompt / --from_file")


def check_control(config: GenerationConfig) -> None:
    """LLLite / ControlNet inputs: guide images need a model that uses them (SDXL's rule for --cn too)."""
    if config.guide_image_path and not config.lllite and not config.controlnets:
        raise UserError("--guide_image_path is given but no --control_net_lllite_models / --control_net_models "
                        "to use it")
    for spec in config.lllite:
        if not os.path.isfile(spec.weights):
            raise ModelLoadError(f"--control_net_lllite_models '{spec.weights}': no such file")
    check_specs(config.controlnets)
    if config.highres_fix is not None:
        config.highres_fix.check()
        if config.controlnets and not config.highres_fix.disable_control_net:
            raise UserError("--highres_fix_scale with --control_net_models needs --highres_fix_disable_control_net "
                            "(the img2img second pass cannot use ControlNets yet)")
    if config.controlnets and config.image_path:
        raise UserError("--control_net_models cannot be combined with --image_path (img2img) yet")
    for p in config.prompts:
        if p.control_image and not config.lllite and not config.controlnets:
            raise UserError(f"{where_in_prompts(p)}: --cn needs --control_net_lllite_models or --control_net_models")


class SDXLGenerator:
    """Runs planned requests on loaded models and writes the PNGs."""

    def __init__(self, models: Any, config: GenerationConfig, device: torch.device):
        self.config = config
        self.device = device
        self.dtype = DTYPES[config.dtype]
        # SDXL's VAE overflows in fp16: decode in fp32 then (bf16 has the range); --no_half_vae: always fp32
        self.vae_dtype = torch.float32 if self.dtype == torch.float16 or config.no_half_vae else self.dtype
        for model in (models.unet, models.text_encoder1, models.text_encoder2):
            move_model(model, device, self.dtype)
        move_model(models.vae, device, self.vae_dtype)
        self.models = models
        # before the networks: their text-encoder LoRAs wrap the (resized) embedding tables' encoders
        self.expander = load_textual_inversion(
            config.textual_inversion_embeddings, [models.tokenizer1, models.tokenizer2],
            [models.text_encoder1, models.text_encoder2]) if config.textual_inversion_embeddings else TokenExpander()
        self.networks = AttachedNetworks(models.vae, [models.text_encoder1, models.text_encoder2], models.unet, config,
                                         device, self.dtype)
        self.regions = None
        # --mask_path: the networks' regions, or without networks sd-scripts' inpainting mask for --image_path
        self.inpaint_masks = InpaintMasks(config.mask_path) if config.mask_path and not config.networks else None
        self._inpaint = None
        if config.mask_path and self.networks.networks:
            self.regions = attach_regions(self.networks.networks, config.mask_path,
                                          config.network_regional_mask_max_color_codes,
                                          [p.template.source for p in config.prompts if p.template is not None])
        self.pipe = SDXLFamily().build_pipeline(SDXLFamilyModels.from_loaded(models), config.sampler)
        self._img2img = None
        self.controlnets: list = []
        self.controlnet_pipe = None
        if config.controlnets:
            self.controlnets = load_controlnets(config.controlnets, "sdxl", models.unet, device, self.dtype)
            if self.controlnets:
                self.controlnet_pipe = build_sdxl_pipeline(self.pipe, self.controlnets)
        self.run_stamp = time.strftime("%Y%m%d%H%M%S")
        self.sampler = canonical_sampler_name(config.sampler)
        self.progress = ImageProgress(0, 0, enabled=False)  # generate() shows one per run

    @property
    def img2img(self):
        if self._img2img is None:
            from diffusers import StableDiffusionXLImg2ImgPipeline

            self._img2img = StableDiffusionXLImg2ImgPipeline(**self.pipe.components)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    @torch.no_grad()
    def generate(self, requests: Sequence[ImageRequest]) -> list[Path]:
        paths: list[Path] = []
        batches = make_batches(requests, self.config.batch_size)
        with ImageProgress(len(requests), len(batches)) as self.progress:
            for batch in batches:
                if self.config.highres_fix is not None:
                    paths += self._run_highres(batch, self.config.highres_fix)
                else:
                    images = self._decode(self._latents(batch))
                    paths += [self._save(req, image) for req, image in zip(batch, images)]
                self.progress.done(len(batch))
        return paths

    def _run_highres(self, batch: list[ImageRequest], fix: HighresFix) -> list[Path]:
        """Stage 1 small, upscale, stage 2 img2img at full size (library.sample.highres_fix)."""
        paths: list[Path] = []
        stage1 = [fix.stage1(r) for r in batch]
        latents = self._latents(stage1)
        small = self._decode(latents) if fix.save_1st or not fix.latents_upscaling else None
        if fix.save_1st:
            paths += [self._save(r, im, "0") for r, im in zip(stage1, small)]
        first = batch[0]
        if fix.latents_upscaling:
            init: Any = upscale_latents(latents, first.width, first.height)
        else:
            init = [im.resize((first.width, first.height), Image.Resampling.LANCZOS) for im in small]
        stage2 = [fix.stage2(r, self.config.strength) for r in batch]
        images = self._decode(self._latents(stage2, init=init, control=not fix.disable_control_net))
        extra = fix.record()
        return paths + [self._save(r, im, "1", extra) for r, im in zip(stage2, images)]

    def _latents(self, batch: list[ImageRequest], init: Any = None, control: bool = True) -> torch.Tensor:
        """Denoise one batch to latents: text-to-image, or img2img from `init` (images or latents) or from the
        requests' init images."""
        first = batch[0]
        size = (first.width, first.height)
        self.networks.set_multipliers(first.network_muls)
        if self.regions is not None:
            self.regions.set_size(first.width, first.height)
        guide = None
        if first.control_image is not None and control:
            guide = images_to_tensor(load_rgb(r.control_image, size) for r in batch).to(self.device)
        self.networks.set_control(guide)
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in batch]
        kwargs: dict[str, Any] = dict(
            prompt=[self.expander.expand(r.prompt) for r in batch],
            negative_prompt=None if first.negative_prompt is None else
            [self.expander.expand(r.negative_prompt) for r in batch],
            num_inference_steps=first.steps,
            guidance_scale=first.scale,
            generator=generators,
            original_size=(first.original_size[1], first.original_size[0]),
            target_size=(first.height, first.width),
            crops_coords_top_left=first.crop,
            # sd-scripts conditions the negative prompt on the same crop and target size, and on
            # --original_width_negative/--original_height_negative (--nw/--nh) when given
            negative_original_size=_hw(first.negative_original_size or first.original_size),
            negative_crops_coords_top_left=first.crop,
            negative_target_size=(first.height, first.width),
            output_type="latent",
        )
        if first.weighted or first.negative_scale is not None:  # --negative_scale: sd-scripts' encoding throughout
            kwargs.update(self._embeds(batch))
        masks = None
        if init is None and first.init_image is not None:
            init = [load_rgb(r.init_image, size) for r in batch]
            if self.inpaint_masks is not None:
                masks = self.inpaint_masks.for_batch([r.index for r in batch], size)
                kwargs.update(mask_image=masks, width=first.width, height=first.height)
        if masks is not None and self._inpaint is None:
            self._inpaint = inpaint_pipeline(self.pipe)
        img2img = self._inpaint if masks is not None else (self.img2img if init is not None else self._img2img)
        pipes = [self.pipe, self.controlnet_pipe, img2img]
        with unet_options(first, self.pipe.unet, pipes, self.sampler, lambda: self._empty_embeds(batch)):
            if init is not None:
                self.progress.show_steps(img2img)
                latents = img2img(image=init, strength=first.strength, **kwargs).images
            else:
                noise = initial_noise(generators, self.pipe.unet.config.in_channels, first.height, first.width)
                pipe = self.pipe
                if self.controlnet_pipe is not None and first.controlnet_images is not None and control:
                    pipe = self.controlnet_pipe
                    kwargs.update(sdxl_call_kwargs(self.controlnets, controlnet_images(batch, size, self.controlnets)))
                self.progress.show_steps(pipe)
                latents = pipe(width=first.width, height=first.height, latents=noise.to(self.device, self.dtype),
                               **kwargs).images
        self.networks.set_control(None)
        return latents

    def _empty_embeds(self, batch: Sequence[ImageRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt for --negative_scale, at the sequence length of the batch's prompt embeddings."""
        models = self.models
        return empty_prompt_embeds(
            [models.tokenizer1, models.tokenizer2], [models.text_encoder1, models.text_encoder2],
            [self.expander.expand(r.prompt) for r in batch],
            [self.expander.expand(r.negative_prompt or "") for r in batch],
            self.config.max_embeddings_multiples or 1, self.device)

    def _embeds(self, batch: Sequence[ImageRequest]) -> dict[str, Any]:
        """sd-scripts' weighted, chunked prompt encoding, in place of the pipeline's prompt text."""
        models = self.models
        embeds = encode_sdxl_prompts(
            [models.tokenizer1, models.tokenizer2], [models.text_encoder1, models.text_encoder2],
            [self.expander.expand(r.prompt) for r in batch],
            [self.expander.expand(r.negative_prompt or "") for r in batch],
            self.config.max_embeddings_multiples or 1, self.device)
        return dict(prompt=None, negative_prompt=None, **embeds.as_kwargs())

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = move_model(self.models.vae, self.device, self.vae_dtype)  # img2img may have cast it while encoding
        chunk = self.config.vae_batch_size or latents.shape[0]
        images: list[Image.Image] = []
        for start in range(0, latents.shape[0], chunk):
            part = latents[start:start + chunk].to(self.device, self.vae_dtype) / vae.config.scaling_factor
            pixels = (vae.decode(part).sample.float() / 2 + 0.5).clamp(0, 1)
            arrays = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
            images += [Image.fromarray(a) for a in arrays]
        return images

    def _save(self, req: ImageRequest, image: Image.Image, stage: str = "",
              extra: dict[str, str] | None = None) -> Path:
        return save_request_png(self.config, req, image, self.run_stamp, self.sampler, extra, stage)


def _hw(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) as diffusers' (height, width)."""
    return size[1], size[0]


def run_generation(config: GenerationConfig) -> list[Path]:
    """Check the inputs, plan every image, load the model and networks, generate; returns the PNG paths."""
    from library.models.sdxl_loader import load_sdxl

    check_config(config)
    wildcards = load_wildcards(config)
    base_seed = config.seed if config.seed is not None else random.SystemRandom().randrange(SEED_RANGE)
    requests = plan_requests(config, wildcards, base_seed)
    logger.info("%d image(s) planned, run seed %d", len(requests), base_seed)
    device = resolve_device(config.device)
    models = load_sdxl(config.model, torch.float32, config.tokenizer_cache_dir, config.allow_pickle)
    if config.vae:
        from library.models.sdxl_loader import load_sdxl_vae

        models.vae = load_sdxl_vae(config.vae, allow_pickle=config.allow_pickle)
        logger.info("VAE from %s", config.vae)
    generator = SDXLGenerator(models, config, device)
    if config.interactive:
        from library.sample.interactive import run_interactive, sdxl_planner

        return run_interactive(config, sdxl_planner(base_seed), generator.generate)
    return generator.generate(requests)



__all__ = ["SDXLGenerator", "check_config", "check_control", "run_generation"]
