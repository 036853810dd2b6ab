"""Generation shared by every family's script: requests, planning, attached networks, progress and saving.

The work is split in two phases so that every mistake in the user's input (prompt syntax, wildcards, missing guide
or init images, network files, sizes) is reported before minutes are spent loading a model:

1. `plan_requests` turns the prompt lines into one `ImageRequest` per image, each with its own drawn prompt and
   seed. Image k of a run gets seeds derived from (--seed, k) only, so the same image comes out whatever
   --batch_size is (the batch just stacks independent per-image generators).
2. A family's generator (`sdxl_generate.SDXLGenerator`, `flux_generate.FluxGenerator`) runs batches of compatible
   requests (`make_batches`) through the pipeline its family builds (`ModelFamily.build_pipeline`), with the
   networks of `AttachedNetworks`, shows progress (`ImageProgress`) and saves each PNG with `save_request_png`, so
   captions can be recovered later (tools/captions_from_png.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from library.errors import ModelLoadError, UserError
from library.prompts.language import NO_NEGATIVE_SCALE, PromptSpec, Template, WildcardSet
from library.prompts.weighting import has_attention_syntax
from library.prompts.png_metadata import GenerationInfo, save_png_with_info
from library.prompts.samplers import canonical_sampler_name
from library.sample import deep_shrink, gradual_latent
from library.sample.controlnets import ControlNetSpec
from networks.attach import attach_network_file

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SEED_RANGE = 2**32
LATENT_FACTOR = 8  # SDXL's and FLUX's autoencoders downsample by 8: pixel sizes must be multiples of it
LLLITE_FACTOR = 32  # LLLite's deepest conditioning stack downsamples by 32
DEFAULT_STRENGTH = 0.8  # img2img strength when neither --strength nor --t gives one (as sd-scripts)


# ----------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class NetworkSpec:
    """One additional network (LoRA-like) given on the command line."""

    module: str
    weights: str
    multiplier: float = 1.0
    args: tuple[tuple[str, str], ...] = ()  # --network_args "k=v;k=v": keyword arguments of the module's factory


@dataclass(frozen=True)
class LLLiteSpec:
    weights: str
    multiplier: float = 1.0


@dataclass
class GenerationConfig:
    """Everything a run needs; built from the command line by `library.sample.gen_args.config_from_args`
    (SDXL) or `flux_generate.flux_config_from_args` (FLUX, as its `common` part)."""

    model: str
    outdir: str
    prompts: list[PromptSpec]
    negative_prompt: Template | None = None
    width: int = 1024
    height: int = 1024
    original_width: int | None = None
    original_height: int | None = None
    steps: int = 30
    scale: float = 7.5
    seed: int | None = None
    n_iter: int = 1
    images_per_prompt: int = 1
    batch_size: int = 1
    vae_batch_size: int | None = None
    sampler: str = "euler_a"
    wildcard_dirs: tuple[str, ...] = ()
    device: str | None = None
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    networks: list[NetworkSpec] = field(default_factory=list)
    network_merge: bool = False
    lllite: list[LLLiteSpec] = field(default_factory=list)
    guide_image_path: str | None = None
    image_path: str | None = None
    strength: float | None = None
    tokenizer_cache_dir: str | None = None
    allow_pickle: bool = False
    controlnets: list[ControlNetSpec] = field(default_factory=list)
    no_half_vae: bool = False
    crop_top: int = 0
    crop_left: int = 0
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    sequential_file_name: bool = False
    use_original_file_name: bool = False
    iter_same_seed: bool = False
    network_merge_n_models: int | None = None
    network_show_meta: bool = False
    highres_fix: Any = None  # library.sample.highres_fix.HighresFix when --highres_fix_scale is given
    max_embeddings_multiples: int | None = None  # None: 75 tokens, and the pipeline's own encoding for plain prompts
    negative_scale: float | None = None  # --negative_scale (library.sample.negative_scale)
    deep_shrink: Any = None  # library.sample.deep_shrink.DeepShrink: the --ds_* flags
    gradual_latent: Any = None  # library.sample.gradual_latent.GradualLatent: the --gradual_latent_* flags
    vae: str | None = None  # --vae: a separate VAE (single file or diffusers folder) instead of the model's
    textual_inversion_embeddings: tuple[str, ...] = ()  # sd-scripts' SDXL embedding files (clip_l / clip_g)
    interactive: bool = False  # --interactive: prompts are read from stdin, one per line, until end of input
    mask_path: str | None = None  # --mask_path: regions of the networks (library.sample.regional_mask)
    network_regional_mask_max_color_codes: int | None = None  # regions by colour code instead of by channel

    def __post_init__(self) -> None:
        # sd-scripts' --vae_batch_size is a float: below 1 it is a fraction of --batch_size
        if self.vae_batch_size is not None and not isinstance(self.vae_batch_size, int):
            value = float(self.vae_batch_size)
            self.vae_batch_size = max(1, int(self.batch_size * value)) if 0 < value < 1 else int(value)


@dataclass(frozen=True)
class ImageRequest:
    """One image to generate, with every choice already made (prompt drawn, seed fixed, files resolved)."""

    index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    width: int
    height: int
    steps: int
    scale: float
    original_size: tuple[int, int]  # (width, height)
    crop: tuple[int, int] = (0, 0)  # (top, left)
    negative_original_size: tuple[int, int] | None = None  # (width, height); None: the same as original_size
    clip_prompt: str | None = None  # sd-scripts' --c: recorded in the PNG only (SDXL has no separate CLIP prompt)
    filename: str | None = None  # a prompt's --f: the PNG's name (a number is appended when it is taken)
    weighted: bool = False  # encode with attention weights / long prompts (library.sample.long_prompt)
    network_muls: tuple[float, ...] | None = None
    control_image: str | None = None
    init_image: str | None = None
    strength: float | None = None
    controlnet_images: tuple[tuple[str, ...], ...] | None = None  # per ControlNet, one guide per input
    negative_scale: float | None = None
    deep_shrink: Any = None  # DeepShrink, or None: off
    gradual_latent: Any = None  # GradualLatent, or None: off

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call without changing any image.

        Whether a negative prompt exists is part of the key: SDXL uses zero embeddings for "no negative prompt" but
        encodes "" when other images of the batch have one, which would change the image.
        """
        return (self.width, self.height, self.steps, self.scale, self.original_size, self.crop,
                self.negative_original_size, self.network_muls, self.weighted,
                self.negative_prompt is None, self.control_image is None, self.init_image is None, self.strength,
                self.controlnet_images is None, self.negative_scale, self.deep_shrink, self.gradual_latent)


# ----------------------------------------------------------------------------------------------------- planning


def derive_seed(base: int, index: int, purpose: str = "image") -> int:
    """A 32-bit seed from the run seed and the image index; hashing keeps neighbouring runs' seeds unrelated."""
    digest = hashlib.sha256(f"{base}:{index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def list_images(path: str, flag: str) -> list[str]:
    """One image file, or the images of a folder in name order; a missing or empty path names the flag."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise UserError(f"{flag} '{path}': the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return found
    raise UserError(f"{flag} '{path}': no such file or folder")


def _check_size(width: int, height: int, factor: int, why: str, where: str) -> None:
    if width % factor or height % factor:
        raise UserError(f"{where}: size {width}x{height} must be a multiple of {factor} ({why})")


def where_in_prompts(spec: PromptSpec) -> str:
    """Where a prompt came from, for error messages (\"prompt line 3\")."""
    return f"prompt line {spec.line_no}" if spec.line_no else "prompt"


def check_common(config: GenerationConfig) -> None:
    """The checks every generation script shares (counts, prompts, networks); control images are the script's."""
    for name, value in (("--batch_size", config.batch_size), ("--n_iter", config.n_iter),
                        ("--images_per_prompt", config.images_per_prompt), ("--steps", config.steps)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if config.max_embeddings_multiples is not None and config.max_embeddings_multiples < 1:
        raise UserError(f"--max_embeddings_multiples must be at least 1, got {config.max_embeddings_multiples}")
    if config.vae_batch_size is not None and config.vae_batch_size < 1:
        raise UserError(f"--vae_batch_size must be at least 1, got {config.vae_batch_size}")
    if not config.prompts and not config.interactive:
        raise UserError("no prompts: give --prompt or a --from_file with at least one prompt line")
    if config.sampler:
        canonical_sampler_name(config.sampler)
    if config.dtype not in ("fp32", "fp16", "bf16"):
        raise UserError(f"unknown precision '{config.dtype}'")
    if config.strength is not None and not 0.0 <= config.strength <= 1.0:
        raise UserError(f"--strength must be between 0 and 1, got {config.strength}")
    if config.network_merge_n_models is not None and config.network_merge_n_models < 0:
        raise UserError(f"--network_merge_n_models must be at least 0, got {config.network_merge_n_models}")
    for spec in config.networks:
        if not os.path.isfile(spec.weights):
            raise ModelLoadError(f"--network_weights '{spec.weights}': no such file")
    if config.network_merge and any(p.network_muls for p in config.prompts):
        raise UserError("per-prompt --am cannot change networks merged with --network_merge; drop one of them")
    for p in config.prompts:
        if p.filename and Path(p.filename).name != p.filename:
            raise UserError(f"{where_in_prompts(p)}: --f '{p.filename}' must be a file name, not a path")
        if p.network_muls and len(p.network_muls) > len(config.networks):
            raise UserError(f"{where_in_prompts(p)}: --am gives {len(p.network_muls)} multipliers but only "
                            f"{len(config.networks)} network(s) are loaded")


# prompt options that act on a U-Net with classifier-free guidance (SDXL), with what they are
UNET_PROMPT_OPTIONS = {"negative_scale": "--nl (negative scale)", "ds_depth_1": "--dsd1 (Deep Shrink)",
                       "ds_timesteps_1": "--dst1 (Deep Shrink)", "ds_depth_2": "--dsd2 (Deep Shrink)",
                       "ds_timesteps_2": "--dst2 (Deep Shrink)", "ds_ratio": "--dsr (Deep Shrink)",
                       "gl_timesteps": "--glt (gradual latent)", "gl_ratio": "--glr (gradual latent)",
                       "gl_every_n_steps": "--gle (gradual latent)", "gl_ratio_step": "--gls (gradual latent)",
                       "gl_s_noise": "--glsn (gradual latent)", "gl_unsharp_params": "--glus (gradual latent)"}


def reject_unet_prompt_options(config: GenerationConfig, family: str) -> None:
    """For scripts without a U-Net and guidance (FLUX): a line that uses SDXL's --nl/--ds*/--gl* options fails
    before any model loads, rather than being silently drawn without them."""
    for p in config.prompts:
        for name, option in UNET_PROMPT_OPTIONS.items():
            if getattr(p, name, None) is not None:
                raise UserError(f"{where_in_prompts(p)}: {option} works with SDXL's U-Net only, not with {family}; "
                                "remove it from the line")


def load_wildcards(config: GenerationConfig) -> WildcardSet | None:
    """The wildcard files, with every wildcard that a prompt names checked to exist."""
    wildcards = WildcardSet.from_dirs(config.wildcard_dirs) if config.wildcard_dirs else None
    templates = [t for p in config.prompts for t in (p.template, p.negative_template) if t is not None]
    if config.negative_prompt is not None:
        templates.append(config.negative_prompt)
    for template in templates:
        if template.wildcard_names():
            if wildcards is None:
                name = sorted(template.wildcard_names())[0]
                raise UserError(f"prompt uses wildcard '__{name}__' but no --wildcards directory was given")
            wildcards.check(template)
    return wildcards


def plan_requests(config: GenerationConfig, wildcards: WildcardSet | None, base_seed: int,
                  start: int = 0) -> list[ImageRequest]:
    """One request per image, in generation order: for each iteration, each prompt line, each image of the line.
    Image indices (and so seeds and names) count from `start` (--interactive plans one line at a time)."""
    guides = list_images(config.guide_image_path, "--guide_image_path") if config.guide_image_path else []
    inits = list_images(config.image_path, "--image_path") if config.image_path else []
    cn_guides = [[list_images(g, "--guide_image_path") for g in spec.guides] for spec in config.controlnets]
    requests: list[ImageRequest] = []
    per_line_count: dict[int, int] = {}
    for iteration in range(config.n_iter):
        # --iter_same_seed: one seed per pass over the prompts, shared by every image without its own --d
        iter_seed = derive_seed(base_seed, iteration, "iteration") if config.iter_same_seed else None
        for line_index, line in enumerate(config.prompts):
            # sd-scripts: a line with {e$$...} gives one image per combination instead of --images_per_prompt
            expanded = line.expand()
            specs = expanded if len(expanded) > 1 else [line] * config.images_per_prompt
            for spec in specs:
                k = start + len(requests)
                j = per_line_count.get(line_index, 0)
                per_line_count[line_index] = j + 1
                requests.append(_request(config, spec, k, j, base_seed, wildcards, guides, inits, cn_guides,
                                         iter_seed))
    return requests


def _request(config: GenerationConfig, spec: PromptSpec, k: int, j: int, base_seed: int,
             wildcards: WildcardSet | None, guides: list[str], inits: list[str],
             cn_guides: Sequence[Sequence[list[str]]] = (), iter_seed: int | None = None) -> ImageRequest:
    rng = random.Random(derive_seed(base_seed, k, "prompt"))
    drawn = spec.render(rng, wildcards)
    negative = drawn.negative_prompt
    if spec.negative_template is None and config.negative_prompt is not None:
        negative = config.negative_prompt.render(rng, wildcards)
    width = spec.width or config.width
    height = spec.height or config.height
    where = where_in_prompts(spec)
    _check_size(width, height, LATENT_FACTOR, "the VAE works on 8x8 pixel blocks", where)
    control = spec.control_image or (guides[k % len(guides)] if guides else None)
    if config.lllite:
        _check_size(width, height, LLLITE_FACTOR, "ControlNet-LLLite needs it", where)
        if control is None:
            raise UserError(f"{where}: ControlNet-LLLite needs a guide image: give --guide_image_path or --cn")
        if not os.path.isfile(control):
            raise UserError(f"{where}: guide image '{control}' does not exist")
    controlnet_images = None
    if cn_guides:  # a prompt's --cn replaces every guide image of the line
        controlnet_images = tuple(tuple(spec.control_image or files[k % len(files)] for files in per_input)
                                  for per_input in cn_guides)
        for path in {p for per_model in controlnet_images for p in per_model}:
            if not os.path.isfile(path):
                raise UserError(f"{where}: guide image '{path}' does not exist")
    init = inits[k % len(inits)] if inits else None
    strength = None
    if init is not None:
        strength = spec.strength if spec.strength is not None else (
            config.strength if config.strength is not None else DEFAULT_STRENGTH)
    seed = spec.seed_for(j)
    if seed is None:
        seed = iter_seed
    original_size = (spec.original_width or config.original_width or width,
                     spec.original_height or config.original_height or height)
    negative_original = (spec.original_width_negative or config.original_width_negative,
                         spec.original_height_negative or config.original_height_negative)
    negative_original_size = None
    if any(negative_original):
        negative_original_size = (negative_original[0] or original_size[0], negative_original[1] or original_size[1])
    return ImageRequest(
        index=k,
        prompt=drawn.prompt,
        negative_prompt=negative or None,
        seed=seed if seed is not None else derive_seed(base_seed, k),
        width=width,
        height=height,
        steps=spec.steps or config.steps,
        scale=spec.scale if spec.scale is not None else config.scale,
        original_size=original_size,
        crop=(spec.crop_top if spec.crop_top is not None else config.crop_top,
              spec.crop_left if spec.crop_left is not None else config.crop_left),
        negative_original_size=negative_original_size,
        clip_prompt=spec.clip_prompt,
        filename=spec.filename,
        weighted=config.max_embeddings_multiples is not None or has_attention_syntax(drawn.prompt)
        or has_attention_syntax(negative or ""),
        network_muls=spec.network_muls,
        control_image=control,
        init_image=init,
        strength=strength,
        controlnet_images=controlnet_images,
        **_unet_options(config, spec, where),
    )


def _unet_options(config: GenerationConfig, spec: PromptSpec, where: str) -> dict[str, Any]:
    """Negative scale, Deep Shrink and gradual latent for one line: its --nl/--ds*/--gl* over the flags."""
    negative_scale = config.negative_scale
    if spec.negative_scale is not None:
        negative_scale = None if spec.negative_scale == NO_NEGATIVE_SCALE else float(spec.negative_scale)
    shrink = deep_shrink.resolve(config.deep_shrink, spec)
    if shrink is not None:
        shrink.check(where)
    gradual = gradual_latent.resolve(config.gradual_latent, spec, where)
    if gradual is not None:
        gradual.check(where)
    return dict(negative_scale=negative_scale, deep_shrink=shrink, gradual_latent=gradual)


def make_batches(requests: Sequence[ImageRequest], batch_size: int) -> list[list[ImageRequest]]:
    """Consecutive requests with equal batch keys, at most `batch_size` per batch (generation order is kept)."""
    batches: list[list[ImageRequest]] = []
    for request in requests:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].batch_key() == request.batch_key():
            batches[-1].append(request)
        else:
            batches.append([request])
    return batches


# ----------------------------------------------------------------------------------------------------- networks

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class AttachedNetworks:
    """The LoRA-like networks and LLLite models hooked into (or merged into) one family's models: the denoiser
    (U-Net or transformer), the text encoders in the family's order, and the VAE."""

    def __init__(self, vae: torch.nn.Module, text_encoders: list[torch.nn.Module], denoiser: torch.nn.Module,
                 config: GenerationConfig, device: torch.device, dtype: torch.dtype):
        self.networks: list[Any] = []
        self.positions: list[int] = []  # index in config.networks of each hooked network (merged ones are not)
        self.default_muls = [spec.multiplier for spec in config.networks]
        merge_n = len(config.networks) if config.network_merge else (config.network_merge_n_models or 0)
        for position, spec in enumerate(config.networks):
            if config.network_show_meta:
                log_network_metadata(spec.weights)
            network = attach_network_file(spec.module, spec.weights, spec.multiplier, vae, text_encoders, denoiser,
                                          position < merge_n, device, dtype, dict(spec.args))
            if network is not None:  # None: merged into the weights
                self.networks.append(network)
                self.positions.append(position)
        from networks import control_net_lllite

        self.lllites = []
        for spec in config.lllite:
            lllite = control_net_lllite.create_network_from_weights(denoiser, spec.weights, spec.multiplier)
            lllite.to(device, dtype).eval()
            lllite.apply_to()
            self.lllites.append(lllite)

    def set_multipliers(self, muls: Sequence[float] | None) -> None:
        """Per-prompt --am multipliers (missing ones fall back to --network_mul)."""
        for network, i in zip(self.networks, self.positions):
            mul = muls[i] if muls is not None and i < len(muls) else self.default_muls[i]
            network.set_multiplier(mul)

    @torch.no_grad()
    def set_control(self, cond: torch.Tensor | None) -> None:
        """Embed the guide images once for the whole batch (all denoising steps reuse the embedding)."""
        for lllite in self.lllites:
            lllite.set_cond_image(cond)


def log_network_metadata(path: str) -> None:
    """--network_show_meta: the training metadata stored in a .safetensors network (nothing for other formats)."""
    if not path.endswith(".safetensors"):
        logger.info("%s: no metadata (not a .safetensors file)", path)
        return
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    logger.info("metadata of %s: %s", path, metadata or "(none)")
    print(f"metadata of {path}:")
    for key in sorted(metadata):
        print(f"  {key}: {metadata[key]}")


# ----------------------------------------------------------------------------------------------------- images


def load_rgb(path: str, size: tuple[int, int]) -> Image.Image:
    """An image as RGB at (width, height); guide images are used as given, only resized."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image '{path}': {exc}") from None
    return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.LANCZOS)


def images_to_tensor(images: Iterable[Image.Image]) -> torch.Tensor:
    """[B, 3, H, W] float in [0, 1]."""
    arrays = [torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, 3)
              for im in images]
    return torch.stack(arrays).permute(0, 3, 1, 2).float() / 255.0


def initial_noise(generators: Sequence[torch.Generator], channels: int, height: int, width: int) -> torch.Tensor:
    """Starting latents drawn in float32 on the CPU, one generator per image, then cast by the caller.

    Drawing in the run's dtype would consume the generator differently for fp16/bf16, so `--fp16` would start from
    other noise than fp32 for the same seed; drawing here keeps the seed -> image mapping across precisions and
    devices. (This is exactly what the pipeline itself draws in float32.)
    """
    shape = (1, channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


def move_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move only when needed (diffusers warns on every dtype cast, even a no-op one)."""
    param = next(model.parameters())
    if param.device != device or param.dtype != dtype:
        model.to(device=device, dtype=dtype)
    return model


def resolve_device(name: str | None) -> torch.device:
    if name:
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise UserError(f"--device '{name}': {exc}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def controlnet_images(batch: Sequence[ImageRequest], size: tuple[int, int], loaded: Sequence[Any]) -> list:
    """`[model][input]` -> the batch's guide images (RGB at the output size), for the active ControlNets only."""
    return [[[load_rgb(r.controlnet_images[net.position][i], size) for r in batch] for i in range(len(net.modes))]
            for net in loaded]


def output_stem(config: GenerationConfig, req: ImageRequest, run_stamp: str, stage: str = "") -> str:
    """The PNG's name without extension: sd-scripts' --use_original_file_name (img2img: the init image's name),
    --sequential_file_name (im_000001, counting images from 1), or im_<run>_<index>_<seed>. `stage` is sd-scripts'
    highres-fix prefix of the index: "0" for the first pass, "1" for the final image."""
    if req.filename:
        return Path(req.filename).stem + (f"_{stage}" if stage == "0" else "")
    if config.use_original_file_name and req.init_image:
        return Path(req.init_image).stem + (f"_{stage}" if stage == "0" else "")
    if config.sequential_file_name:
        return f"im_{stage}{req.index + 1:06d}"
    return f"im_{run_stamp}_{stage}{req.index:06d}_{req.seed}"


def save_request_png(config: GenerationConfig, req: ImageRequest, image: Image.Image, run_stamp: str,
                     sampler: str, extra: dict[str, str] | None = None, stage: str = "") -> Path:
    """Write one image as `im_<run>_<index>_<seed>.png` with its prompt and settings in the PNG text chunks."""
    outdir = Path(config.outdir)
    stem = output_stem(config, req, run_stamp, stage)
    path = outdir / f"{stem}.png"
    suffix = 1
    while path.exists():  # a second run in the same second (or a reused name): never overwrite
        path = outdir / f"{stem}_{suffix}.png"
        suffix += 1
    extra = dict(extra or {})
    if req.crop != (0, 0):
        extra["crop_top"], extra["crop_left"] = str(req.crop[0]), str(req.crop[1])
    if req.original_size != (req.width, req.height):
        extra["original_width"], extra["original_height"] = str(req.original_size[0]), str(req.original_size[1])
    if req.negative_original_size is not None:
        extra["original_width_negative"] = str(req.negative_original_size[0])
        extra["original_height_negative"] = str(req.negative_original_size[1])
    if req.clip_prompt is not None:
        extra["clip_prompt"] = req.clip_prompt
    if config.max_embeddings_multiples is not None:
        extra["max_embeddings_multiples"] = str(config.max_embeddings_multiples)
    if config.vae:
        extra["vae"] = os.path.basename(config.vae.rstrip("/\\"))
    if config.textual_inversion_embeddings:  # the tokens a prompt can use
        extra["textual_inversion"] = ",".join(Path(p).stem for p in config.textual_inversion_embeddings)
    if config.mask_path:
        extra["mask_path"] = config.mask_path
    if req.control_image:
        extra["guide_image"] = req.control_image
    if req.controlnet_images:
        extra["controlnet_guides"] = ";".join(",".join(per_model) for per_model in req.controlnet_images)
    if req.init_image:
        extra["init_image"] = req.init_image
        extra["strength"] = f"{req.strength:g}"
    if req.network_muls:
        extra["network_muls"] = ",".join(f"{m:g}" for m in req.network_muls)
    if req.negative_scale is not None:
        extra["negative-scale"] = f"{req.negative_scale:g}"  # sd-scripts' chunk name
    if req.deep_shrink is not None:
        extra["deep_shrink"] = req.deep_shrink.describe()
    if req.gradual_latent is not None:
        extra["gradual_latent"] = req.gradual_latent.describe()
    info = GenerationInfo(prompt=req.prompt, negative_prompt=req.negative_prompt or "", seed=req.seed,
                          steps=req.steps, scale=req.scale, sampler=sampler, width=req.width,
                          height=req.height, model=os.path.basename(config.model.rstrip("/\\")),
                          extra=extra)
    return save_png_with_info(image, path, info)


# ----------------------------------------------------------------------------------------------------- progress


class ImageProgress:
    """Two progress bars with ETA: images done of the run (outer) and denoising steps of the current pipeline call
    (inner, diffusers' own bar, one per batch). Generation of a synthetic data set runs for hours: the user sees
    how far it is and when it ends."""

    def __init__(self, total: int, batches: int, enabled: bool = True):
        self.enabled = enabled
        self.bar = tqdm(total=total, unit="image", desc="images", position=0, dynamic_ncols=True,
                        disable=not enabled)
        self.batches = batches
        self.number = 0

    def show_steps(self, pipe: Any) -> None:
        """Turn the pipeline's per-step bar on (families build their pipelines quiet, for sampling in training)."""
        self.number += 1
        if not self.enabled:
            pipe.set_progress_bar_config(disable=True)
            return
        pipe.set_progress_bar_config(desc=f"batch {self.number}/{self.batches} steps", unit="step", position=1,
                                     leave=False, dynamic_ncols=True)

    def done(self, images: int) -> None:
        self.bar.update(images)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ImageProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

