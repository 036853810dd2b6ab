"""Command-line flags of sdxl_gen_img.py (sd-scripts' names), and their translation into a `GenerationConfig`.

One function per concern adds an argument group, so another generation script can reuse the groups it needs.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from library.errors import UserError
from library.prompts.language import PromptSyntaxError, parse_prompt_line, parse_template, read_prompt_file
from library.prompts.samplers import SD_SCRIPTS_SAMPLER_CHOICES
from library.sample.controlnets import ControlNetSpec, specs_from_flags
from library.sample.highres_fix import HighresFix
from library.sample.generation import GenerationConfig, LLLiteSpec, NetworkSpec

DEFAULT_NETWORK_MODULE = "networks.lora"
DEFAULT_SIZE = 1024  # --W / --H when not given (sd-scripts' SDXL default)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", "--pretrained_model_name_or_path", dest="ckpt", default=None,
                   help="SDXL single file (.safetensors) or diffusers folder")
    g.add_argument("--tokenizer_cache_dir", default=None, help="folder with tokenizer files")
    g.add_argument("--allow_pickle", action="store_true", help="allow pickled .ckpt/.pt files (unsafe)")
    g.add_argument("--fp16", action="store_true", help="run the U-Net and text encoders in float16")
    g.add_argument("--bf16", action="store_true", help="run the models in bfloat16")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch SDPA attention (the default; accepted for sd-scripts)")
    g.add_argument("--no_half_vae", action="store_true", help="decode with the VAE in float32 under --fp16/--bf16")
    g.add_argument("--vae", type=str, default=None,
                   help="a separate VAE: single file (LDM or diffusers keys) or diffusers AutoencoderKL folder")
    g.add_argument("--textual_inversion_embeddings", type=str, nargs="*", default=None,
                   help="sd-scripts' SDXL embedding files (clip_l + clip_g tensors); the token is the file name")


def add_environment_args(p: argparse.ArgumentParser) -> None:
    """sd-scripts' speed/memory switches that do not change the images; accepted so that their command lines run,
    with one warning each (see `warn_environment_flags`)."""
    g = p.add_argument_group("accepted for sd-scripts compatibility (no effect here)")
    g.add_argument("--xformers", action="store_true", help="no effect: PyTorch SDPA attention is always used")
    g.add_argument("--diffusers_xformers", action="store_true", help="no effect: PyTorch SDPA attention is used")
    g.add_argument("--opt_channels_last", action="store_true", help="no effect: memory layout is left to PyTorch")
    g.add_argument("--vae_slices", type=int, default=None, help="no effect: use --vae_batch_size to bound memory")
    g.add_argument("--no_preview", action="store_true", help="no effect: images are never previewed")
    g.add_argument("--clip_vision_strength", type=float, default=None,
                   help="no effect: sd-scripts' CLIP-vision image prompt is not available for SDXL here")
    g.add_argument("--network_pre_calc", action="store_true",
                   help="no effect on the images: networks are applied as hooks (or merged with --network_merge)")
    g.add_argument("--console_log_level", type=str, default=None,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="log level (default INFO)")
    g.add_argument("--console_log_file", type=str, default=None, help="also write the log to this file")
    g.add_argument("--console_log_simple", action="store_true", help="plain log lines (they always are here)")


def setup_gen_logging(args: argparse.Namespace) -> None:
    """INFO lines on the console unless --console_log_level says otherwise; --console_log_file gets them too."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if getattr(args, "console_log_file", None):
        handlers.append(logging.FileHandler(args.console_log_file, encoding="utf-8"))
    level = getattr(logging, getattr(args, "console_log_level", None) or "INFO")
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", handlers=handlers, force=True)


# flag -> why it has no effect here; `--no_preview` is silent (we never preview, so it is simply true)
ENVIRONMENT_ONLY = {
    "xformers": "PyTorch SDPA attention is always used",
    "diffusers_xformers": "PyTorch SDPA attention is always used",
    "opt_channels_last": "the memory layout is left to PyTorch",
    "vae_slices": "the VAE decodes whole images; bound its memory with --vae_batch_size",
    "clip_skip": "SDXL always uses the penultimate layer of both text encoders, as sd-scripts' SDXL generator does",
    "highres_fix_upscaler": "no upscaler modules are available here; the first pass is upscaled with Lanczos "
                            "(or in latent space with --highres_fix_latents_upscaling)",
    "highres_fix_upscaler_args": "it belongs to --highres_fix_upscaler",
    "network_pre_calc": "networks are applied as hooks (or merged with --network_merge); the images are the same",
    "clip_vision_strength": "no CLIP-vision image prompt is available for SDXL here; the text prompt's pooled "
                            "embedding is used as usual",
}


def warn_environment_flags(args: argparse.Namespace, log: logging.Logger | None = None) -> list[str]:
    """One warning per given environment-only flag (it does not change the run); returns the flags warned about."""
    log = log or logging.getLogger(__name__)
    given = [name for name in ENVIRONMENT_ONLY if getattr(args, name, None) not in (None, False)]
    for name in given:
        log.warning("--%s has no effect here (%s); continuing", name, ENVIRONMENT_ONLY[name])
    return given


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", default=None, help="one prompt (the prompt language, options like --n allowed)")
    g.add_argument("--from_file", default=None, help="prompt file: one prompt per line")
    g.add_argument("--negative_prompt", default=None, help="negative prompt for lines without --n")
    g.add_argument("--wildcards", action="append", default=[], metavar="DIR",
                   help="folder of __name__ wildcard files (repeatable)")
    g.add_argument("--n_iter", type=int, default=1, help="passes over all prompts")
    g.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt line and pass")


def add_text_encoding_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt encoding (SDXL)")
    g.add_argument("--max_embeddings_multiples", type=int, default=None,
                   help="prompts up to 75 x N tokens, encoded in chunks of 75 (sd-scripts' long prompts)")
    g.add_argument("--clip_skip", type=int, default=None,
                   help="no effect with SDXL: both text encoders' penultimate layers are used (as in sd-scripts)")


def add_image_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image")
    g.add_argument("--W", type=int, default=None, help=f"width in pixels (multiple of 8; default {DEFAULT_SIZE})")
    g.add_argument("--H", type=int, default=None, help=f"height in pixels (multiple of 8; default {DEFAULT_SIZE})")
    g.add_argument("--original_width", type=int, default=None, help="SDXL size conditioning (default: --W)")
    g.add_argument("--original_height", type=int, default=None, help="SDXL size conditioning (default: --H)")
    g.add_argument("--original_width_negative", type=int, default=None,
                   help="SDXL size conditioning of the negative prompt (default: --original_width)")
    g.add_argument("--original_height_negative", type=int, default=None,
                   help="SDXL size conditioning of the negative prompt (default: --original_height)")
    g.add_argument("--crop_top", type=int, default=None, help="SDXL crop conditioning, top (default 0)")
    g.add_argument("--crop_left", type=int, default=None, help="SDXL crop conditioning, left (default 0)")
    g.add_argument("--steps", type=int, default=50, help="denoising steps")
    g.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--sampler", type=str, default="ddim", choices=list(SD_SCRIPTS_SAMPLER_CHOICES),
                   help="sampler (sd-scripts' names; k_* are aliases)")
    g.add_argument("--seed", type=int, default=None, help="run seed: image k gets a seed derived from it and k")
    g.add_argument("--image_path", default=None, help="img2img: init image, or a folder of them (cycled)")
    g.add_argument("--strength", type=float, default=None, help="img2img strength in [0, 1] (default 0.8)")


def add_batch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batching and output")
    g.add_argument("--outdir", default="outputs", help="folder for the PNGs (default: outputs)")
    g.add_argument("--batch_size", type=int, default=1)
    g.add_argument("--vae_batch_size", type=float, default=None,
                   help="images per VAE decode (default: the batch); below 1: that fraction of --batch_size")


def add_highres_fix_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("highres fix (library/sample/highres_fix.py)")
    g.add_argument("--highres_fix_scale", type=float, default=None,
                   help="enable highres fix: draw at this fraction of the size first, then upscale and refine")
    g.add_argument("--highres_fix_steps", type=int, default=28, help="steps of the first (small) pass")
    g.add_argument("--highres_fix_strength", type=float, default=None,
                   help="img2img strength of the first pass (default: --strength)")
    g.add_argument("--highres_fix_save_1st", action="store_true", help="also save the first-pass images")
    g.add_argument("--highres_fix_latents_upscaling", action="store_true",
                   help="upscale the first pass in latent space (bilinear) rather than as pixels (Lanczos)")
    g.add_argument("--highres_fix_upscaler", type=str, default=None,
                   help="sd-scripts' upscaler module: none is available here (warns; Lanczos is used)")
    g.add_argument("--highres_fix_upscaler_args", type=str, default=None, help="arguments of --highres_fix_upscaler")
    g.add_argument("--highres_fix_disable_control_net", action="store_true",
                   help="no ControlNet / LLLite guidance in the second pass")


def highres_fix_from_args(args: argparse.Namespace) -> HighresFix | None:
    if args.highres_fix_scale is None:
        return None
    return HighresFix(args.highres_fix_scale, args.highres_fix_steps, args.highres_fix_strength,
                      args.highres_fix_save_1st, args.highres_fix_latents_upscaling,
                      args.highres_fix_disable_control_net)


def add_naming_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("file names and seeds")
    g.add_argument("--sequential_file_name", action="store_true", help="name the images im_000001.png, ...")
    g.add_argument("--use_original_file_name", action="store_true",
                   help="img2img: name each image after its init image (<name>.png)")
    g.add_argument("--iter_same_seed", action="store_true",
                   help="every image of one --n_iter pass uses the same seed (unless its prompt gives --d)")


def add_network_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("networks")
    g.add_argument("--network_module", nargs="*", default=None, help="module per network (default networks.lora)")
    g.add_argument("--network_weights", nargs="*", default=None, help="network files")
    g.add_argument("--network_mul", nargs="*", type=float, default=None, help="multiplier per network")
    g.add_argument("--network_merge", action="store_true", help="merge networks into the weights")
    g.add_argument("--network_args", nargs="*", default=None,
                   help="per network: key=value;key=value passed to its module's create_network_from_weights")
    g.add_argument("--network_merge_n_models", type=int, default=None,
                   help="merge the first N networks into the weights, hook the others (for their --am)")
    g.add_argument("--network_show_meta", action="store_true", help="print the metadata of each network file")


def add_regional_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("regional networks (library/sample/regional_mask.py)")
    g.add_argument("--mask_path", type=str, default=None,
                   help="mask image whose regions confine the networks: R, G, B channels for networks 1-3")
    g.add_argument("--network_regional_mask_max_color_codes", type=int, default=None,
                   help="regions by colour code instead (network i: the colour whose R/G/B bits spell i) for the "
                        "first N networks")


def add_interactive_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("interactive")
    g.add_argument("--interactive", action="store_true",
                   help="read prompt lines from stdin, one at a time, until end of input (instead of --prompt)")


def add_lllite_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNet-LLLite")
    g.add_argument("--control_net_lllite_models", nargs="*", default=None, help="ControlNet-LLLite files")
    g.add_argument("--control_net_multipliers", nargs="*", type=float, default=None, help="multiplier per LLLite")


def add_controlnet_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNets (see docs/controlnets.md)")
    g.add_argument("--guide_image_path", nargs="*", default=None,
                   help="guide image or folder of them (cycled over images): one for all, or one per ControlNet "
                        "input (a union model with several --control_net_types takes one per type)")
    g.add_argument("--control_net_models", nargs="*", default=None,
                   help="diffusers ControlNet folders or .safetensors files (diffusers key layout)")
    g.add_argument("--control_net_weights", nargs="*", type=float, default=None, help="conditioning scale per model")
    g.add_argument("--control_net_ratios", nargs="*", type=float, default=None,
                   help="fraction of the steps, from the start, each model acts on (0 = not used)")
    g.add_argument("--control_net_types", nargs="*", default=None,
                   help="union models: control types per model, comma-separated (e.g. canny,depth)")


def add_unet_guidance_args(p: argparse.ArgumentParser) -> None:
    """--negative_scale, Deep Shrink and gradual latent, with sd-scripts' names, types and defaults; a prompt line
    overrides them with --nl, --dsd1 --dst1 --dsd2 --dst2 --dsr, --glt --glr --gle --gls --glsn --glus."""
    g = p.add_argument_group("negative scale (library/sample/negative_scale.py)")
    g.add_argument("--negative_scale", type=float, default=None,
                   help="a guidance scale of its own for the negative prompt: u + scale*(c-u) - negative_scale*(n-u)")
    g = p.add_argument_group("Deep Shrink (library/sample/deep_shrink.py)")
    g.add_argument("--ds_depth_1", type=int, default=None,
                   help="enable Deep Shrink: shrink the U-Net's hidden states at this input depth (0 to 8)")
    g.add_argument("--ds_timesteps_1", type=int, default=650, help="shrink at depth 1 while the timestep >= this")
    g.add_argument("--ds_depth_2", type=int, default=None, help="a second depth, used below --ds_timesteps_1")
    g.add_argument("--ds_timesteps_2", type=int, default=650, help="shrink at depth 2 while the timestep >= this")
    g.add_argument("--ds_ratio", type=float, default=0.5, help="Deep Shrink's downscaling ratio")
    g = p.add_argument_group("gradual latent (library/sample/gradual_latent.py; euler_a only)")
    g.add_argument("--gradual_latent_timesteps", type=int, default=None,
                   help="enable gradual latent: start small and enlarge the latents below this timestep")
    g.add_argument("--gradual_latent_ratio", type=float, default=0.5, help="the starting size ratio (0.5: half)")
    g.add_argument("--gradual_latent_ratio_step", type=float, default=0.125, help="ratio added at each enlargement")
    g.add_argument("--gradual_latent_every_n_steps", type=int, default=3, help="steps between enlargements")
    g.add_argument("--gradual_latent_s_noise", type=float, default=1.0, help="noise scale of the enlarging steps")
    g.add_argument("--gradual_latent_unsharp_params", type=str, default=None,
                   help="unsharp mask at each enlargement: ksize,sigma,strength[,target_x] (e.g. 3,0.5,0.5,1)")


def unet_guidance_from_args(args: argparse.Namespace) -> dict:
    """The GenerationConfig fields of `add_unet_guidance_args`."""
    from library.sample.deep_shrink import DeepShrink
    from library.sample.gradual_latent import GradualLatent, parse_unsharp

    if getattr(args, "ds_ratio", None) is None:  # a parser without the group
        return {}
    shrink = DeepShrink(args.ds_depth_1, args.ds_timesteps_1, args.ds_depth_2, args.ds_timesteps_2, args.ds_ratio)
    shrink.check()
    gradual = GradualLatent(args.gradual_latent_timesteps, args.gradual_latent_ratio, args.gradual_latent_ratio_step,
                            args.gradual_latent_every_n_steps, args.gradual_latent_s_noise,
                            parse_unsharp(args.gradual_latent_unsharp_params))
    gradual.check()
    return dict(negative_scale=args.negative_scale, deep_shrink=shrink, gradual_latent=gradual)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for add in (add_model_args, add_prompt_args, add_image_args, add_batch_args, add_network_args, add_lllite_args,
                add_controlnet_args, add_highres_fix_args, add_naming_args, add_text_encoding_args,
                add_regional_args, add_interactive_args, add_unet_guidance_args, add_environment_args):
        add(p)
    return p


def _per_item(values: Sequence | None, count: int, default, flag: str) -> list:
    """sd-scripts' per-network lists: one value for all, or one per item."""
    if not values:
        return [default] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise UserError(f"{flag}: expected 1 or {count} values, got {len(values)}")
    return list(values)


def _prompts(args: argparse.Namespace):
    if args.prompt is not None and args.from_file is not None:
        raise UserError("give --prompt or --from_file, not both")
    if args.from_file is not None:
        return read_prompt_file(args.from_file)
    if args.prompt is None:
        if getattr(args, "interactive", False):
            return []  # read from stdin as the run goes
        raise UserError("no prompt: give --prompt or --from_file")
    try:
        return [parse_prompt_line(args.prompt)]
    except PromptSyntaxError as exc:
        raise exc.with_location("--prompt") from None


def network_args(values: Sequence[str] | None, index: int) -> tuple[tuple[str, str], ...]:
    """sd-scripts' --network_args: the index-th value holds "key=value;key=value" for the index-th network."""
    if not values or index >= len(values) or not values[index]:
        return ()
    pairs = []
    for item in values[index].split(";"):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--network_args '{values[index]}': expected key=value;key=value, got '{item}'")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def controlnet_flags(args: argparse.Namespace, lllite: bool) -> tuple[list[ControlNetSpec], str | None]:
    """(ControlNet specs, LLLite's guide path) from the shared --guide_image_path values."""
    guides = list(args.guide_image_path or [])
    specs = specs_from_flags(args.control_net_models, guides, args.control_net_weights, args.control_net_ratios,
                             args.control_net_types)
    if len(guides) > 1 and not specs:
        raise UserError(f"--guide_image_path: {len(guides)} paths given; several are for --control_net_models only")
    return specs, (guides[0] if guides and (lllite or not specs) else None)


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    if not args.ckpt:
        raise UserError("--ckpt (or --pretrained_model_name_or_path) is required")
    if args.fp16 and args.bf16:
        raise UserError("give --fp16 or --bf16, not both")
    weights = args.network_weights or []
    modules = _per_item(args.network_module, len(weights), DEFAULT_NETWORK_MODULE, "--network_module")
    muls = _per_item(args.network_mul, len(weights), 1.0, "--network_mul")
    lllite_files = args.control_net_lllite_models or []
    lllite_muls = _per_item(args.control_net_multipliers, len(lllite_files), 1.0, "--control_net_multipliers")
    controlnets, guide_path = controlnet_flags(args, bool(lllite_files))
    negative = None
    if args.negative_prompt:
        try:
            negative = parse_template(args.negative_prompt)
        except PromptSyntaxError as exc:
            raise exc.with_location("--negative_prompt") from None
    return GenerationConfig(
        model=args.ckpt, outdir=args.outdir, prompts=_prompts(args), negative_prompt=negative,
        width=args.W or DEFAULT_SIZE, height=args.H or DEFAULT_SIZE, original_width=args.original_width,
        original_height=args.original_height, original_width_negative=args.original_width_negative,
        original_height_negative=args.original_height_negative, crop_top=args.crop_top or 0,
        crop_left=args.crop_left or 0, no_half_vae=args.no_half_vae,
        sequential_file_name=args.sequential_file_name, use_original_file_name=args.use_original_file_name,
        iter_same_seed=args.iter_same_seed, network_merge_n_models=args.network_merge_n_models,
        network_show_meta=args.network_show_meta,
        max_embeddings_multiples=getattr(args, "max_embeddings_multiples", None),
        **unet_guidance_from_args(args),
        highres_fix=highres_fix_from_args(args),
        steps=args.steps, scale=args.scale, seed=args.seed, n_iter=args.n_iter,
        images_per_prompt=args.images_per_prompt, batch_size=args.batch_size, vae_batch_size=args.vae_batch_size,
        sampler=args.sampler, wildcard_dirs=tuple(args.wildcards), device=args.device,
        dtype="fp16" if args.fp16 else ("bf16" if args.bf16 else "fp32"),
        networks=[NetworkSpec(m, w, x, network_args(args.network_args, i))
                  for i, (m, w, x) in enumerate(zip(modules, weights, muls))],
        network_merge=args.network_merge,
        lllite=[LLLiteSpec(w, x) for w, x in zip(lllite_files, lllite_muls)],
        guide_image_path=guide_path, controlnets=controlnets, image_path=args.image_path, strength=args.strength,
        tokenizer_cache_dir=args.tokenizer_cache_dir, allow_pickle=args.allow_pickle,
        vae=args.vae, textual_inversion_embeddings=tuple(args.textual_inversion_embeddings or ()),
        interactive=args.interactive, mask_path=args.mask_path,
        network_regional_mask_max_color_codes=args.network_regional_mask_max_color_codes,
    )


# Public names for other generation scripts (flux_gen_img.py) that build their configs from the same flags.
per_item = _per_item
prompts_from_args = _prompts
