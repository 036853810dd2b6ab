"""The interface of a model family: what the one training loop and the generation scripts ask of SDXL, FLUX, ...

Required hooks: `load_models`, `model_identity` (cache provenance), `encode_text`, `encode_images`,
`noise_and_timesteps`, `predict`, `loss_target`, `build_pipeline` (the diffusers pipeline generation runs) and
`sample_images` (sampling during training). Optional hooks with neutral defaults: `loss_weights`,
`modules_kept_off_device`, `sharding_units`, `after_base_models_prepared`. Everything else (data, caches, networks,
optimisation, saving, resume, logging) is the loop's and is shared by every family; families are found by name in
library/families/registry.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from library.config.model_flags import ModelConfig

if TYPE_CHECKING:  # annotations only: the hooks' argument types, imported without loading them at run time
    from diffusers import DiffusionPipeline
    from PIL import Image

    from library.config.train_config import RunConfig
    from library.config.training_flags import TrainingConfig
    from library.data.dataset import Batch


@dataclass
class NoisyInput:
    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    extras: dict[str, Any]


class ModelFamily(ABC):
    """One model family (SDXL, FLUX, ...). Instances hold no training state; models are passed in."""

    name: str = ""
    #: keys of the family's models dict that networks may attach to, e.g. {"unet": ..., "text_encoders": [...]}
    denoiser_key: str = "unet"

    def __init__(self, config: ModelConfig | None = None) -> None:
        """A family is bound to its model config when built (`get_family(name, config)`): its own flags are read
        from `self.config`, the one place they are stored."""
        self.config = config if config is not None else ModelConfig()

    @abstractmethod
    def load_models(self, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
        """Return a dict with at least the denoiser, "vae", "text_encoders" (list) and "tokenizers" (list)."""

    @abstractmethod
    def model_identity(self, models: dict[str, Any], part: str) -> str:
        """A string that changes when the weights of `part` ("vae" or "text") change: cache provenance."""

    @abstractmethod
    def encode_text(self, models: dict[str, Any], captions: list[str]) -> dict[str, torch.Tensor]:
        ...

    @abstractmethod
    def encode_images(self, models: dict[str, Any], images: torch.Tensor,
                      generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents; `generators` (one per sample) make the posterior sample
        reproducible."""

    @abstractmethod
    def noise_and_timesteps(self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator],
                            cfg: TrainingConfig) -> NoisyInput:
        """`generator` is one generator per sample (or one for the batch): draw with library.families.noise.randn/rand
        so that a sample's noise does not depend on how a global batch is split across processes."""

    @abstractmethod
    def predict(self, models: dict[str, Any], inp: NoisyInput, text: dict[str, torch.Tensor],
                batch: Batch) -> torch.Tensor:
        ...

    @abstractmethod
    def loss_target(self, models: dict[str, Any], latents: torch.Tensor, inp: NoisyInput) -> torch.Tensor:
        ...

    def loss_weights(self, models: dict[str, Any], inp: NoisyInput, cfg: TrainingConfig) -> torch.Tensor | None:
        """Per-sample loss weights (e.g. min-SNR); None for uniform."""
        return None

    def modules_kept_off_device(self, models: dict[str, Any], cfg: RunConfig) -> list[torch.nn.Module]:
        """Submodules of the denoiser that must never be moved to the device as a whole (blocks that
        --blocks_to_swap keeps on the CPU): moving them in first and out afterwards would need the whole model's
        memory on the device at load time, which is what swapping exists to avoid."""
        return []

    def sharding_units(self, models: dict[str, Any]) -> list[torch.nn.Module]:
        """The denoiser's blocks, in run order: one FSDP unit each when the base model is sharded."""
        return []

    def after_base_models_prepared(self, models: dict[str, Any], cfg: RunConfig, device: torch.device) -> None:
        """Called once the frozen base models have their device and weight dtype, before any network is attached:
        the place for storage tricks that a later `.to(dtype)` would undo (fp8 weights, block swapping)."""

    @abstractmethod
    def build_pipeline(self, models: dict[str, Any], sampler: str | None = None, edit: bool = False) -> DiffusionPipeline:
        """The diffusers pipeline that generates with `models`, built quiet (no progress bar: sampling in training
        runs between steps; the generation scripts turn the bar on). `sampler` is an sd-scripts sampler name
        (library/prompts/samplers.py; a family with one sampler ignores it). `edit=True` asks for the pipeline
        that edits a given image (FLUX Kontext); a family without one raises UserError."""

    @abstractmethod
    def sample_images(self, models: dict[str, Any], prompts: list[SampleRequest], sampler: str,
                      before_generate: Callable[[SampleRequest], None] | None = None) -> list[Image.Image]:
        """Generate one image per prompt spec (seeded); before_generate lets a network set per-image inputs."""


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
    extras: dict[str, Any] | None = None  # e.g. {"control_image": path} for LLLite


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
