"""Load SDXL from a single-file checkpoint (SGM layout) or a diffusers folder, and save the single-file layout.

Single files carry no config: it is inferred from tensor shapes (channel widths, block types, transformer depths,
text-encoder sizes) plus what shapes cannot tell (head counts, GroupNorm groups, activations), which come from the
file's `sdxl_config` metadata when we wrote it, and SDXL's published values otherwise (64-dim heads, 32 groups).
Bad input (wrong family, missing keys, pickles without --allow_pickle) raises ModelLoadError naming the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.errors import ModelLoadError
from library.fileio import save_safetensors_atomic
from library.models import sdxl_keys
from library.models.single_file import json_config_from_metadata, read_single_file
from library.models.tokenizers import load_sdxl_tokenizers
from library.models.vae_config import count_indices, groups_dividing, infer_autoencoder_kl_config

CONFIG_METADATA_KEY = "sdxl_config"
SDXL_HEAD_DIM = 64
# What tensor shapes cannot tell, as in the published SDXL base model.
SDXL_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {"sample_size": 128},
    "vae": {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "te1": {"hidden_act": "quick_gelu", "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407},
    "te2": {"hidden_act": "gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0},
}
# Config values written into the metadata of files we save (those not inferable from shapes).
METADATA_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "unet": ("attention_head_dim", "norm_num_groups", "sample_size"),
    "vae": ("norm_num_groups", "sample_size", "scaling_factor", "force_upcast"),
    "te1": ("num_attention_heads", "hidden_act", "projection_dim", "bos_token_id", "eos_token_id", "pad_token_id"),
    "te2": ("num_attention_heads", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id"),
}
MAX_KEYS_IN_MESSAGE = 8


@dataclass
class SDXLModels:
    """The six components of SDXL; the models follow diffusers / transformers conventions."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder1: CLIPTextModel
    text_encoder2: CLIPTextModelWithProjection
    tokenizer1: CLIPTokenizer
    tokenizer2: CLIPTokenizer


# ----------------------------------------------------------------------------------------------------------------
# reading files
def _check_family(path: str, keys: set[str]) -> None:
    """Reject checkpoints of other model families with a message that says which family they look like."""
    if any(k.startswith(("double_blocks.", "single_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        raise ModelLoadError(f"{path}: this is a FLUX checkpoint, not SDXL (it has double_blocks/single_blocks keys)")
    has_unet = any(k.startswith(sdxl_keys.UNET_PREFIX) for k in keys)
    if any(k.startswith("cond_stage_model.") for k in keys):
        raise ModelLoadError(
            f"{path}: this looks like a Stable Diffusion 1.x/2.x checkpoint (cond_stage_model.* keys), not SDXL"
        )
    if not has_unet and not any(k.startswith("conditioner.embedders.") for k in keys):
        hint = " (it looks like a diffusers U-Net file: pass the diffusers folder)" if "conv_in.weight" in keys else ""
        raise ModelLoadError(
            f"{path}: not an SDXL single-file checkpoint: no keys start with '{sdxl_keys.UNET_PREFIX}' or "
            f"'conditioner.embedders.'{hint}"
        )
    if has_unet and sdxl_keys.UNET_PREFIX + "label_emb.0.0.weight" not in keys and not any(
        k.startswith("conditioner.") for k in keys
    ):
        raise ModelLoadError(
            f"{path}: this looks like a Stable Diffusion 1.x/2.x U-Net (no label_emb and no conditioner keys), not SDXL"
        )


# ----------------------------------------------------------------------------------------------------------------
# config inference (diffusers / transformers names)
def infer_unet_config(unet: Mapping[str, torch.Tensor], te2_projection_dim: int, meta: dict[str, Any]) -> dict:
    """diffusers UNet2DConditionModel config of an SDXL-layout U-Net state dict."""
    keys = list(unet.keys())
    levels = count_indices(keys, r"down_blocks\.(\d+)\.")
    channels = [unet[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    down_attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels)]
    up_attn = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(levels)]
    down_depth = [max(1, count_indices(keys, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for i in range(levels)]
    up_depth = [max(1, count_indices(keys, rf"up_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")) for i in range(levels)]
    attn2_k = next(unet[k] for k in keys if k.endswith("attn2.to_k.weight"))
    proj_in = next(unet[k] for k in keys if k.endswith("proj_in.weight"))
    add_in = unet["add_embedding.linear_1.weight"].shape[1]
    config = {
        "in_channels": unet["conv_in.weight"].shape[1],
        "out_channels": unet["conv_out.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "block_out_channels": channels,
        "layers_per_block": 2,
        "transformer_layers_per_block": down_depth,
        "attention_head_dim": [max(1, c // SDXL_HEAD_DIM) for c in channels],
        "cross_attention_dim": attn2_k.shape[1],
        "use_linear_projection": proj_in.ndim == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (add_in - te2_projection_dim) // 6,
        "projection_class_embeddings_input_dim": add_in,
        **SDXL_DEFAULTS["unet"],
        "norm_num_groups": groups_dividing(channels),
    }
    if up_depth != list(reversed(down_depth)):
        config["reverse_transformer_layers_per_block"] = [up_depth[i] for i in range(levels)]
    config.update(meta)
    return config


def infer_vae_config(vae: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """diffusers AutoencoderKL config of an LDM/diffusers VAE state dict (GroupNorm groups: SDXL's 32, fewer for
    tiny widths)."""
    return infer_autoencoder_kl_config(
        vae, meta, latent_channels_key="post_quant_conv.weight", latent_channels_dim=0, defaults=SDXL_DEFAULTS["vae"]
    )


def infer_text_config(te: Mapping[str, torch.Tensor], which: str, meta: dict[str, Any]) -> CLIPTextConfig:
    """CLIPTextConfig of a text-encoder state dict with `text_model.` names (`which` is "te1" or "te2")."""
    tokens = te["text_model.embeddings.token_embedding.weight"]
    hidden = tokens.shape[1]
    values: dict[str, Any] = {
        "vocab_size": tokens.shape[0],
        "hidden_size": hidden,
        "max_position_embeddings": te["text_model.embeddings.position_embedding.weight"].shape[0],
        "intermediate_size": te["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": count_indices(te.keys(), r"text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, hidden // SDXL_HEAD_DIM),
        **SDXL_DEFAULTS[which],
    }
    if which == "te2":
        values["projection_dim"] = te["text_projection.weight"].shape[0]
    values.update(meta)
    return CLIPTextConfig(**values)


# ----------------------------------------------------------------------------------------------------------------
# building models from state dicts
def _empty_models(configs: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The four models with meta-device parameters (no random init: real SDXL would take minutes)."""
    with init_empty_weights():
        return {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "te1": CLIPTextModel(configs["te1"]),
            "te2": CLIPTextModelWithProjection(configs["te2"]),
        }


def _fit(name: str, sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return sdxl_keys.fit_text_encoder_keys(sd, model) if name.startswith("te") else sd


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_IN_MESSAGE])
    return shown + (f", ... ({len(keys) - MAX_KEYS_IN_MESSAGE} more)" if len(keys) > MAX_KEYS_IN_MESSAGE else "")


def _check_keys(path: str, file_keys: set[str], models: dict[str, torch.nn.Module]) -> None:
    """Compare the file's keys with those the inferred models need; name the missing ones in the file's layout."""
    template = {name: _fit(name, dict(m.state_dict()), m) for name, m in models.items()}
    expected = set(sdxl_keys.diffusers_to_sgm_state_dict(template["unet"], template["vae"], template["te1"], template["te2"]))
    missing = sorted(expected - file_keys - set(sdxl_keys.IGNORED_SGM_KEYS))
    if missing:
        raise ModelLoadError(
            f"{path}: incomplete SDXL checkpoint: {len(missing)} key(s) missing: {_format_keys(missing)}"
        )


def _load_into(models: dict[str, torch.nn.Module], parts: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype) -> None:
    for name, model in models.items():
        sd = {k: v.to(dtype) for k, v in _fit(name, parts[name], model).items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.eval()




def load_sdxl_single_file(
    path: str, dtype: torch.dtype = torch.float32, tokenizer_cache_dir: str | None = None, allow_pickle: bool = False
) -> SDXLModels:
    """Load an SGM-layout single-file SDXL checkpoint."""
    tensors, metadata = read_single_file(path, allow_pickle)
    file_keys = set(tensors)
    _check_family(path, file_keys)
    unknown: list[str] = []
    parts = sdxl_keys.sgm_to_diffusers_state_dicts(tensors, unknown)
    meta = json_config_from_metadata(path, metadata, CONFIG_METADATA_KEY)
    try:
        te2_config = infer_text_config(parts["te2"], "te2", meta.get("te2", {}))
        configs = {
            "unet": infer_unet_config(parts["unet"], te2_config.projection_dim, meta.get("unet", {})),
            "vae": infer_vae_config(parts["vae"], meta.get("vae", {})),
            "te1": infer_text_config(parts["te1"], "te1", meta.get("te1", {})),
            "te2": te2_config,
        }
    except (KeyError, StopIteration, IndexError) as exc:
        what = exc.args[0] if isinstance(exc, KeyError) and exc.args else "a transformer block"
        raise ModelLoadError(
            f"{path}: incomplete SDXL checkpoint: cannot infer the model config, key {what!r} (diffusers name) is missing"
        ) from exc
    try:
        models = _empty_models(configs)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: cannot build SDXL models from the inferred config: {exc}") from exc
    _check_keys(path, file_keys, models)
    try:
        _load_into(models, parts, dtype)
    except RuntimeError as exc:  # shape mismatches: a file of another layout
        raise ModelLoadError(f"{path}: tensors do not fit the SDXL layout inferred from the file: {exc}") from exc
    tok1, tok2 = load_sdxl_tokenizers(None, tokenizer_cache_dir)
    return SDXLModels(models["unet"], models["vae"], models["te1"], models["te2"], tok1, tok2)


def load_sdxl_diffusers(
    path: str, dtype: torch.dtype = torch.float32, tokenizer_cache_dir: str | None = None
) -> SDXLModels:
    """Load a StableDiffusionXLPipeline folder (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer*/)."""
    missing = [sub for sub in ("unet", "vae", "text_encoder", "text_encoder_2") if not os.path.isdir(os.path.join(path, sub))]
    if missing:
        raise ModelLoadError(f"{path}: not an SDXL diffusers folder: {len(missing)} sub-folder(s) missing: {', '.join(missing)}")
    loaders = (
        ("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
        ("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection),
    )
    loaded = {}
    for sub, cls in loaders:
        try:
            loaded[sub] = cls.from_pretrained(path, subfolder=sub, torch_dtype=dtype).eval()
        except Exception as exc:  # noqa: BLE001 - library errors vary; the user needs the folder and the reason
            raise ModelLoadError(f"{os.path.join(path, sub)}: cannot load {cls.__name__}: {exc}") from exc
    tok1, tok2 = load_sdxl_tokenizers(path, tokenizer_cache_dir)
    return SDXLModels(loaded["unet"], loaded["vae"], loaded["text_encoder"], loaded["text_encoder_2"], tok1, tok2)


def load_sdxl(
    path: str, dtype: torch.dtype = torch.float32, tokenizer_cache_dir: str | None = None, allow_pickle: bool = False
) -> SDXLModels:
    """Load SDXL from a single file (.safetensors; .ckpt/.pt only with allow_pickle) or a diffusers folder."""
    if os.path.isdir(path):
        return load_sdxl_diffusers(path, dtype, tokenizer_cache_dir)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file or folder (expected an SDXL .safetensors file or diffusers folder)")
    return load_sdxl_single_file(path, dtype, tokenizer_cache_dir, allow_pickle)


# ----------------------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_metadata(models: SDXLModels) -> str:
    """JSON of the config values that shapes cannot tell, so that our own files reload exactly."""
    sources = {
        "unet": dict(models.unet.config),
        "vae": dict(models.vae.config),
        "te1": models.text_encoder1.config.to_dict(),
        "te2": models.text_encoder2.config.to_dict(),
    }
    return json.dumps(
        {part: {k: _jsonable(sources[part][k]) for k in keys if k in sources[part]} for part, keys in METADATA_CONFIG_KEYS.items()}
    )


def save_sdxl_single_file(models: SDXLModels, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write the official SGM single-file layout (atomically: a temp file in the same folder, then os.replace)."""
    sd = sdxl_keys.diffusers_to_sgm_state_dict(
        models.unet.state_dict(), models.vae.state_dict(),
        models.text_encoder1.state_dict(), models.text_encoder2.state_dict(),
    )
    sd = {k: v.detach().to("cpu") for k, v in sd.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[CONFIG_METADATA_KEY] = config_metadata(models)
    save_safetensors_atomic(sd, path, meta)


def load_sdxl_vae(path: str, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> AutoencoderKL:
    """`--vae`: a diffusers AutoencoderKL folder, or a single file with the VAE in the LDM layout (as published,
    e.g. sdxl_vae.safetensors; a `first_stage_model.` prefix is accepted) or in diffusers names."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"--vae {path}: a folder must be a diffusers AutoencoderKL folder (config.json missing)")
        return AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
    tensors, _ = read_single_file(path, allow_pickle)
    tensors = {k[len(sdxl_keys.VAE_PREFIX):] if k.startswith(sdxl_keys.VAE_PREFIX) else k: v for k, v in tensors.items()}
    if "encoder.conv_in.weight" not in tensors:
        raise ModelLoadError(f"--vae {path}: not a VAE file (no encoder.conv_in.weight among {len(tensors)} keys)")
    unknown: list[str] = []
    diffusers_sd = tensors if "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors else \
        sdxl_keys.ldm_vae_to_diffusers(tensors, unknown)
    if unknown:
        raise ModelLoadError(f"--vae {path}: {len(unknown)} key(s) of no known VAE layout, e.g. {unknown[:3]}")
    vae = AutoencoderKL(**infer_vae_config(diffusers_sd, {}))
    missing, unexpected = vae.load_state_dict(diffusers_sd, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"--vae {path}: {len(missing)} missing and {len(unexpected)} unexpected key(s), e.g. "
                             f"{(missing + unexpected)[:3]}")
    return vae.to(dtype)
