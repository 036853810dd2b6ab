"""FLUX.1 batch generation (text-to-image, Kontext, ControlNets) on the planning, networks, progress and saving of
`library.sample.generation`: the same prompt language and per-prompt options, seeds per image index, LoRA
attachment and PNG metadata, so `flux_gen_img.py` differs from `sdxl_gen_img.py` only where the model does.

FLUX specifics:
* `scale` (`--guidance_scale`, per prompt `--l`) is the distilled guidance of FLUX.1 dev; there is no negative
  prompt (one given is ignored with a warning, so SDXL prompt files still work).
* Kontext: `--control_image` (a file, or a folder paired with the prompt lines, or one prompt line for every image of
  the folder) or a prompt's `--cn` makes the line an edit of that image; the output takes the control image's size
  (rounded down to 16 px) unless `--W`/`--H` or the line's `--w`/`--h` say otherwise.
* Starting noise is drawn per image in float32 on the CPU (as for SDXL) and packed into FLUX's 2x2 tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from library.config.flux_config import FluxConfig
from library.errors import UserError
from library.families.flux import FluxFamily, FluxFamilyModels
from library.families.flux_latents import pack_latents, unpack_latents
from library.families.flux_placement import apply_low_vram, check_low_vram_flags, place_transformer
from library.prompts.language import PromptSpec
from library.sample import gen_args
from library.sample.controlnets import build_flux_pipeline, flux_call_kwargs, load_controlnets
from library.sample.flux_prompt_options import warn_ignored_flux_options
from library.sample.generation import (
    DTYPES, SEED_RANGE, AttachedNetworks, GenerationConfig, ImageProgress, ImageRequest, NetworkSpec, check_common,
    controlnet_images, initial_noise, list_images, load_rgb, load_wildcards, make_batches, move_model, plan_requests,
    reject_unet_prompt_options, resolve_device, save_request_png,
)

logger = logging.getLogger(__name__)

FLUX_FACTOR = 16  # 8x autoencoder, then 2x2 packing
DEFAULT_SIZE = 1024
DEFAULT_NETWORK_MODULE = "networks.lora_flux"
SAMPLER = "euler"  # FLUX's flow-matching Euler sampler, the only one


@dataclass
class FluxOptions:
    ae: str | None = None
    clip_l: str | None = None
    t5xxl: str | None = None
    t5xxl_max_token_length: int | None = None  # None: 512 for guidance-distilled (dev), 256 otherwise
    control_image: str | None = None  # Kontext: file or folder
    size_given: bool = False  # --W/--H given: Kontext outputs keep it instead of the control image's size
    fp8_base: bool = False
    blocks_to_swap: int | None = None


@dataclass
class FluxGenerationConfig:
    common: GenerationConfig
    flux: FluxOptions


# ----------------------------------------------------------------------------------------------------- flags


def add_flux_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", "--pretrained_model_name_or_path", dest="ckpt", default=None,
                   help="FLUX transformer (BFL .safetensors), a folder of single files, or a diffusers folder")
    g.add_argument("--ae", default=None, help="FLUX autoencoder (ae.safetensors)")
    g.add_argument("--clip_l", default=None, help="CLIP-L text encoder (.safetensors)")
    g.add_argument("--t5xxl", default=None, help="T5-XXL text encoder (.safetensors)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None, help="T5 tokens (default 512 dev, 256 schnell)")
    g.add_argument("--tokenizer_cache_dir", default=None, help="folder with tokenizer/ and tokenizer_2/")
    g.add_argument("--fp16", action="store_true", help="run the models in float16")
    g.add_argument("--bf16", action="store_true", help="run the models in bfloat16")
    g.add_argument("--fp8_base", action="store_true",
                   help="store the transformer's block Linears in fp8 and upcast per layer (halves their memory)")
    g.add_argument("--blocks_to_swap", type=int, default=None,
                   help="keep this many transformer blocks on the CPU, moving each to the GPU while it runs "
                        "(CUDA only)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_flux_image_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image")
    g.add_argument("--W", type=int, default=None, help="width (multiple of 16; default 1024 or the control image's)")
    g.add_argument("--H", type=int, default=None, help="height (multiple of 16; default 1024 or the control image's)")
    g.add_argument("--steps", type=int, default=28, help="denoising steps")
    g.add_argument("--guidance_scale", "--scale", dest="scale", type=float, default=3.5, help="distilled guidance")
    g.add_argument("--seed", type=int, default=None, help="run seed: image k gets a seed derived from it and k")
    g.add_argument("--control_image", default=None,
                   help="Kontext: control image, or a folder (paired with the prompt lines, or all with one line)")


def build_flux_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    for add in (add_flux_model_args, gen_args.add_prompt_args, add_flux_image_args, gen_args.add_batch_args,
                gen_args.add_network_args, gen_args.add_controlnet_args, gen_args.add_interactive_args):
        add(p)
    return p


def flux_config_from_args(args: argparse.Namespace) -> FluxGenerationConfig:
    if not args.ckpt:
        raise UserError("--pretrained_model_name_or_path (or --ckpt) is required")
    if args.fp16 and args.bf16:
        raise UserError("give --fp16 or --bf16, not both")
    weights = args.network_weights or []
    modules = gen_args.per_item(args.network_module, len(weights), DEFAULT_NETWORK_MODULE, "--network_module")
    muls = gen_args.per_item(args.network_mul, len(weights), 1.0, "--network_mul")
    controlnets, _ = gen_args.controlnet_flags(args, lllite=False)
    if args.guide_image_path and not controlnets:
        raise UserError("--guide_image_path is for --control_net_models; Kontext's image is --control_image")
    common = GenerationConfig(
        model=args.ckpt, outdir=args.outdir, prompts=gen_args.prompts_from_args(args),
        width=args.W or DEFAULT_SIZE, height=args.H or DEFAULT_SIZE, steps=args.steps, scale=args.scale,
        seed=args.seed, n_iter=args.n_iter, images_per_prompt=args.images_per_prompt, batch_size=args.batch_size,
        vae_batch_size=args.vae_batch_size, sampler="", wildcard_dirs=tuple(args.wildcards), device=args.device,
        dtype="fp16" if args.fp16 else ("bf16" if args.bf16 else "fp32"),
        networks=[NetworkSpec(m, w, x, gen_args.network_args(args.network_args, i))
                  for i, (m, w, x) in enumerate(zip(modules, weights, muls))],
        network_merge=args.network_merge, network_merge_n_models=args.network_merge_n_models,
        network_show_meta=args.network_show_meta, controlnets=controlnets, tokenizer_cache_dir=args.tokenizer_cache_dir,
        interactive=args.interactive,
    )
    if args.negative_prompt:
        logger.warning("--negative_prompt: FLUX.1 uses no negative prompt; it is ignored")
    flux = FluxOptions(ae=args.ae, clip_l=args.clip_l, t5xxl=args.t5xxl,
                       t5xxl_max_token_length=args.t5xxl_max_token_length, control_image=args.control_image,
                       size_given=args.W is not None or args.H is not None, fp8_base=args.fp8_base,
                       blocks_to_swap=args.blocks_to_swap)
    return FluxGenerationConfig(common, flux)


# ----------------------------------------------------------------------------------------------------- planning


def _rounded_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read control image '{path}': {exc}") from None
    if w < FLUX_FACTOR or h < FLUX_FACTOR:
        raise UserError(f"control image '{path}' is {w}x{h}: at least {FLUX_FACTOR}x{FLUX_FACTOR} is needed")
    return w // FLUX_FACTOR * FLUX_FACTOR, h // FLUX_FACTOR * FLUX_FACTOR


def kontext_prompts(prompts: Sequence[PromptSpec], options: FluxOptions) -> list[PromptSpec]:
    """Attach Kontext control images to the prompt lines and give those lines the control image's size."""
    specs = list(prompts)
    if options.control_image:
        images = list_images(options.control_image, "--control_image")
        if len(specs) == 1:
            specs = [specs[0]] * len(images)
        elif len(images) == 1:
            images = images * len(specs)
        elif len(images) != len(specs):
            raise UserError(f"--control_image '{options.control_image}': {len(images)} images for {len(specs)} prompt "
                            "lines; give one prompt line for all images, one image for all lines, or as many of each")
        specs = [s if s.control_image else dataclasses.replace(s, control_image=img) for s, img in zip(specs, images)]
    out = []
    for s in specs:
        if s.control_image and not options.size_given and not (s.width or s.height):
            w, h = _rounded_size(s.control_image)
            s = dataclasses.replace(s, width=w, height=h)
        out.append(s)
    return out


def plan_flux_requests(config: FluxGenerationConfig, base_seed: int, start: int = 0) -> list[ImageRequest]:
    """Every image's request (indices from `start`: --interactive plans one line at a time)."""
    common = config.common
    check_common(common)
    reject_unet_prompt_options(common, "FLUX")
    warn_ignored_flux_options(common.prompts)
    check_low_vram_flags(config.flux.blocks_to_swap, "generate")
    if config.flux.control_image and common.controlnets:
        raise UserError("--control_image (Kontext) and --control_net_models cannot be combined")
    prompts = common.prompts if common.controlnets else kontext_prompts(common.prompts, config.flux)
    planned = dataclasses.replace(common, prompts=prompts)
    requests = plan_requests(planned, load_wildcards(planned), base_seed, start)
    for r in requests:
        if r.width % FLUX_FACTOR or r.height % FLUX_FACTOR:
            raise UserError(f"image {r.index} ('{r.prompt[:40]}'): size {r.width}x{r.height} must be a multiple of "
                            f"{FLUX_FACTOR} (FLUX packs 2x2 latents of its 8x autoencoder)")
        if r.control_image and not common.controlnets and not Path(r.control_image).is_file():
            raise UserError(f"image {r.index}: control image '{r.control_image}' does not exist")
    return requests


def _control_size_batches(batches: list[list[ImageRequest]]) -> list[list[ImageRequest]]:
    """Kontext images of one pipeline call must share their size: split batches where it changes."""
    out: list[list[ImageRequest]] = []
    for batch in batches:
        sizes = [_rounded_size(r.control_image) if r.control_image else None for r in batch]
        start = 0
        for i in range(1, len(batch) + 1):
            if i == len(batch) or sizes[i] != sizes[start]:
                out.append(batch[start:i])
                start = i
    return out


# ----------------------------------------------------------------------------------------------------- generation


class FluxGenerator:
    def __init__(self, models: Any, config: FluxGenerationConfig, device: torch.device):
        self.config = config
        self.device = device
        self.dtype = DTYPES[config.common.dtype]
        for model in (models.clip_l, models.t5, models.ae):
            move_model(model, device, self.dtype)
        place_transformer(models.transformer, device, self.dtype, config.flux.blocks_to_swap)
        self.models = models
        # fp8 layers must exist before networks hook in (LoRA keeps the layer's forward), but merging needs the
        # full-precision weights: merge first, then fp8
        merge_first = config.common.network_merge
        if not merge_first:
            self._apply_low_vram()
        self.networks = AttachedNetworks(models.ae, [models.clip_l, models.t5], models.transformer, config.common,
                                         device, self.dtype)
        if merge_first:
            self._apply_low_vram()
        self.family_models = FluxFamilyModels.from_loaded(models, config.flux.t5xxl_max_token_length)
        self.pipes: dict[bool, Any] = {}
        self.family = FluxFamily()
        self.controlnets = load_controlnets(config.common.controlnets, "flux", models.transformer, device, self.dtype)
        self.controlnet_pipe = build_flux_pipeline(self.pipe(False), self.controlnets) if self.controlnets else None
        self.max_length = self.family_models.t5_max_length  # --t5xxl_max_token_length, else the model's default
        self.run_stamp = time.strftime("%Y%m%d%H%M%S")
        self.progress = ImageProgress(0, 0, enabled=False)  # generate() shows one per run

    def _apply_low_vram(self) -> None:
        options = self.config.flux
        check_low_vram_flags(options.blocks_to_swap, "generate", self.device)
        fcfg = FluxConfig(fp8_base=options.fp8_base, blocks_to_swap=options.blocks_to_swap)
        self.block_swapper = apply_low_vram(self.models.transformer, fcfg, self.device)

    def pipe(self, kontext: bool) -> Any:
        if kontext not in self.pipes:
            self.pipes[kontext] = self.family.build_pipeline(self.family_models, edit=kontext)
        return self.pipes[kontext]

    @torch.no_grad()
    def generate(self, requests: Sequence[ImageRequest]) -> list[Path]:
        paths: list[Path] = []
        batches = _control_size_batches(make_batches(requests, self.config.common.batch_size))
        with ImageProgress(len(requests), len(batches)) as self.progress:
            for batch in batches:
                images = self._run_batch(batch)
                paths += [save_request_png(self.config.common, r, im, self.run_stamp, SAMPLER) for r, im in
                          zip(batch, images)]
                self.progress.done(len(batch))
        return paths

    def _run_batch(self, batch: list[ImageRequest]) -> list[Image.Image]:
        first = batch[0]
        self.networks.set_multipliers(first.network_muls)
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in batch]
        channels = self.models.transformer.config.in_channels // 4
        noise = pack_latents(initial_noise(generators, channels, first.height, first.width))
        kwargs: dict[str, Any] = dict(
            prompt=[r.prompt for r in batch], width=first.width, height=first.height,
            num_inference_steps=first.steps, guidance_scale=first.scale, generator=generators,
            latents=noise.to(self.device, self.dtype), max_sequence_length=self.max_length, output_type="latent")
        if first.controlnet_images is not None and self.controlnet_pipe is not None:
            pipe = self.controlnet_pipe
            images = controlnet_images(batch, (first.width, first.height), self.controlnets)
            kwargs.update(flux_call_kwargs(self.controlnets, images))
        elif first.control_image is not None:
            pipe = self.pipe(True)
            size = _rounded_size(first.control_image)
            kwargs.update(image=[load_rgb(r.control_image, size) for r in batch], _auto_resize=False,
                          max_area=first.width * first.height)
        else:
            pipe = self.pipe(False)
        self.progress.show_steps(pipe)
        latents = pipe(**kwargs).images
        return self._decode(latents, first.height, first.width)

    def _decode(self, tokens: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        ae = self.models.ae
        latents = unpack_latents(tokens, height // 8, width // 8)
        chunk = self.config.common.vae_batch_size or latents.shape[0]
        images: list[Image.Image] = []
        for start in range(0, latents.shape[0], chunk):
            part = latents[start:start + chunk].to(self.device, ae.dtype) / ae.config.scaling_factor
            pixels = (ae.decode(part + ae.config.shift_factor).sample.float() / 2 + 0.5).clamp(0, 1)
            arrays = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
            images += [Image.fromarray(a) for a in arrays]
        return images


def run_flux_generation(config: FluxGenerationConfig) -> list[Path]:
    """Check and plan every image, then load FLUX, attach networks and ControlNets, generate; returns PNG paths."""
    from library.models.flux_loader import load_flux_files

    common = config.common
    base_seed = common.seed if common.seed is not None else random.SystemRandom().randrange(SEED_RANGE)
    if common.interactive and common.prompts:
        raise UserError("--interactive reads the prompts from stdin: drop --prompt / --from_file")
    requests = plan_flux_requests(config, base_seed)
    logger.info("%d image(s) planned, run seed %d", len(requests), base_seed)
    device = resolve_device(common.device)
    models = load_flux_files(common.model, ae=config.flux.ae, clip_l=config.flux.clip_l, t5xxl=config.flux.t5xxl,
                             dtype=torch.float32, tokenizer_cache_dir=common.tokenizer_cache_dir)
    generator = FluxGenerator(models, config, device)
    if common.interactive:
        from library.sample.interactive import run_interactive

        return run_interactive(common, lambda line, start: plan_flux_requests(
            dataclasses.replace(config, common=line), base_seed, start), generator.generate)
    return generator.generate(requests)


__all__ = ["FluxGenerationConfig", "FluxGenerator", "FluxOptions", "build_flux_parser", "flux_config_from_args",
           "kontext_prompts", "plan_flux_requests", "run_flux_generation"]
