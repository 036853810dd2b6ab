"""The interface of a model family: what the one training loop and the generation scripts ask of SDXL, FLUX, ...

Required hooks: `load_models`, `model_identity` (cache provenance), `encode_text`, `encode_images`,
`noise_and_timesteps`, `predict`, `loss_target`, `build_pipeline` (the diffusers pipeline generation runs) and
`sample_images` (sampling during training). Optional hooks with neutral defaults: `loss_weights`,
`huber_threshold`, `set_text_options`, `modules_kept_off_device`, `sharding_units`, `after_base_models_prepared`,
and for caching some text encoders' outputs while others train: `text_outputs_by_encoder`, `encode_text_part`,
`text_encoders_trained`.
Every hook that needs the models takes the family's `FamilyModels` (a typed dataclass, subclassed per family for
what only that family carries), never a dict. Everything else (data, caches, networks, optimisation, saving, resume,
logging) is the loop's and is shared by every family; families are found by name in library/families/registry.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Generic, Literal, TypeVar

import torch

from library.config.model_flags import ModelConfig

if TYPE_CHECKING:  # annotations only: the hooks' argument types, imported without loading them at run time
    from diffusers import DiffusionPipeline
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

    from library.config.train_config import RunConfig
    from library.config.training_flags import TrainingConfig
    from library.data.dataset import Batch
    from library.families.sdxl_text import TextOptions
    from library.models.lowvram import BlockSwapper

#: a family's text conditioning by name (e.g. SDXL's "encoder_hidden_states" and "pooled"): what `encode_text`
#: returns, what the text-encoder cache stores and what `predict` reads
TextOutputs = dict[str, torch.Tensor]


@dataclass
class FamilyModels:
    """A family's loaded models, as `load_models` returns them and every other hook, the caches, the networks and
    sampling take them. A family with state of its own that comes with its models (FLUX's T5 length, SDXL's
    caption options) subclasses this (`SDXLFamilyModels`, `FluxFamilyModels`); what is configuration stays on the
    family's bound config.

    `denoiser` is the U-Net (SDXL) or the transformer (FLUX); the family's `denoiser_key` is its published name.
    `text_encoders` and `tokenizers` are in the family's order (SDXL: CLIP-L, CLIP-G; FLUX: CLIP-L, T5).
    `block_swapper` is set by `after_base_models_prepared` when --blocks_to_swap keeps blocks on the CPU."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module] = field(default_factory=list)
    tokenizers: list[PreTrainedTokenizerBase] = field(default_factory=list)
    block_swapper: BlockSwapper | None = None

    def base_modules(self) -> list[torch.nn.Module]:
        """The frozen base models: denoiser, VAE, text encoders."""
        return [self.denoiser, self.vae, *self.text_encoders]


@dataclass
class NoisyInput:
    """One batch's noised latents, the noise and the timesteps drawn for it. `extras` carries the tensors a family's
    later hooks of the same step read back (SDXL: "alphas_cumprod", the schedule these timesteps index; FLUX:
    "degrade_seeds", one --kontext_degrade seed per sample)."""

    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SampleRequest:
    """One image to generate, after the prompt language has been rendered."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 30
    scale: float = 7.0
    seed: int = 0
    control_image: str | None = None  # --cn: LLLite's conditioning image, FLUX Kontext's image to edit
    sampler: str | None = None  # --ss: this prompt's sampler, over --sample_sampler
    guidance_scale: float | None = None  # --g: FLUX's distilled guidance, over `scale`


#: the models type of one family (`ModelFamily[SDXLFamilyModels]`): its hooks take what its `load_models` returns
M = TypeVar("M", bound=FamilyModels)


class ModelFamily(ABC, Generic[M]):
    """One model family (SDXL, FLUX, ...), bound to its model config when built. Instances hold no training state;
    models are passed in."""

    name: ClassVar[str] = ""
    #: the denoiser's published name ("unet", "transformer"): what messages and the family's file names call it
    denoiser_key: ClassVar[str] = "unet"
    #: per text encoder (in `FamilyModels.text_encoders` order), the `TextOutputs` keys that encoder alone produces.
    #: Empty: the outputs cannot be told apart by encoder, so a network that trains a text encoder rules out
    #: --cache_text_encoder_outputs (sd-scripts' SDXL trainer says the same). FLUX fills it in: sd-scripts' partial
    #: caching keeps T5's outputs and runs a trained CLIP-L every step (`encode_text_part`).
    text_outputs_by_encoder: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __init__(self, config: ModelConfig | None = None) -> None:
        """A family is bound to its model config when built (`get_family(name, config)`): its own flags are read
        from `self.config`, the one place they are stored."""
        self.config = config if config is not None else ModelConfig()

    @abstractmethod
    def load_models(self, dtype: torch.dtype) -> M:
        """Load the models the bound config names."""

    @abstractmethod
    def model_identity(self, models: M, part: Literal["vae", "text"]) -> str:
        """A string that changes when the weights of `part` ("vae" or "text") change: cache provenance."""

    @abstractmethod
    def encode_text(self, models: M, captions: list[str]) -> TextOutputs:
        ...

    @abstractmethod
    def encode_images(self, models: M, images: torch.Tensor,
                      generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents; `generators` (one per sample) make the posterior sample
        reproducible."""

    @abstractmethod
    def noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator],
                            cfg: TrainingConfig) -> NoisyInput:
        """`generator` is one generator per sample (or one for the batch): draw with library.families.noise.randn/rand
        so that a sample's noise does not depend on how a global batch is split across processes."""

    @abstractmethod
    def predict(self, models: M, inp: NoisyInput, text: TextOutputs, batch: Batch) -> torch.Tensor:
        ...

    @abstractmethod
    def loss_target(self, models: M, latents: torch.Tensor, inp: NoisyInput) -> torch.Tensor:
        ...

    def encode_text_part(self, models: M, captions: list[str], encoders: tuple[int, ...]) -> TextOutputs:
        """The outputs of the text encoders at `encoders` only (indices into `models.text_encoders`), keyed as
        `text_outputs_by_encoder` says: a partial text-encoder cache stores some, the others are encoded every
        step. Only called on families whose `text_outputs_by_encoder` is filled in."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode its text encoders separately")

    def text_encoders_trained(self, models: M, network: torch.nn.Module, trains_text_encoder: bool) -> list[bool]:
        """Per text encoder, whether `network` trains it. By default every encoder is trained when the network
        trains text encoders; a family whose networks opt in per encoder (FLUX's T5 with train_t5xxl) says so."""
        return [trains_text_encoder] * len(models.text_encoders)

    def loss_weights(self, models: M, inp: NoisyInput, cfg: TrainingConfig) -> torch.Tensor | None:
        """Per-sample loss weights (e.g. min-SNR); None for uniform."""
        return None

    def huber_threshold(self, inp: NoisyInput, cfg: TrainingConfig) -> torch.Tensor | None:
        """The per-sample threshold of --loss_type huber / smooth_l1; None for l1 / l2 (and for a family that has
        no timestep scale to schedule it on)."""
        return None

    def set_text_options(self, models: M, options: TextOptions | None) -> None:
        """Take the run's caption-encoding options (--max_token_length, --weighted_captions; `text_options_from`
        has already warned about those a family does not use) into `models`. Families without such options keep
        the default, which does nothing."""

    def modules_kept_off_device(self, models: M, cfg: RunConfig) -> list[torch.nn.Module]:
        """Submodules of the denoiser that must never be moved to the device as a whole (blocks that
        --blocks_to_swap keeps on the CPU): moving them in first and out afterwards would need the whole model's
        memory on the device at load time, which is what swapping exists to avoid."""
        return []

    def sharding_units(self, models: M) -> list[torch.nn.Module]:
        """The denoiser's blocks, in run order: one FSDP unit each when the base model is sharded."""
        return []

    def after_base_models_prepared(self, models: M, cfg: RunConfig, device: torch.device) -> None:
        """Called once the frozen base models have their device and weight dtype, before any network is attached:
        the place for storage tricks that a later `.to(dtype)` would undo (fp8 weights, block swapping)."""

    @abstractmethod
    def build_pipeline(self, models: M, sampler: str | None = None, edit: bool = False) -> DiffusionPipeline:
        """The diffusers pipeline that generates with `models`, built quiet (no progress bar: sampling in training
        runs between steps; the generation scripts turn the bar on). `sampler` is an sd-scripts sampler name
        (library/prompts/samplers.py; a family with one sampler ignores it). `edit=True` asks for the pipeline
        that edits a given image (FLUX Kontext); a family without one raises UserError."""

    @abstractmethod
    def sample_images(self, models: M, prompts: list[SampleRequest], sampler: str,
                      before_generate: Callable[[SampleRequest], None] | None = None) -> list[Image.Image]:
        """Generate one image per prompt spec (seeded); before_generate lets a network set per-image inputs."""


def module_fingerprint(module: torch.nn.Module) -> str:
    """A content hash of a few parameters: cheap, and it changes when the weights do."""
    import hashlib

    params = list(module.state_dict().values())
    picked = params[:2] + params[len(params) // 2: len(params) // 2 + 1] + params[-2:]
    h = hashlib.sha1()
    for t in picked:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes()[:65536])
    return h.hexdigest()[:16]
