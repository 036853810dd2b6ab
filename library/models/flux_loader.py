"""Load FLUX.1 (transformer, autoencoder, CLIP-L, T5-XXL, tokenizers) from the files users have.

Two layouts are accepted for `--pretrained_model_name_or_path`:
* a BFL single file (`flux1-dev.safetensors`, transformer only) with `--ae`, `--clip_l`, `--t5xxl` single files
  (a folder holding `flux.safetensors`, `ae.safetensors`, `clip_l.safetensors`, `t5xxl.safetensors` also works:
  that is what `tools/make_tiny_model.py --family flux` writes);
* a diffusers `FluxPipeline` folder (`transformer/`, `vae/`, `text_encoder/`, `text_encoder_2/`, tokenizers); the
  single-file flags then replace the folder's components.
Configs are inferred from tensor shapes; the few values shapes cannot tell (rotary axes, GroupNorm groups, CLIP
head count) come from the file's `flux_config` metadata, or FLUX.1's values.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from library.errors import ModelLoadError
from library.models import flux_keys, sdxl_keys
from library.models.sdxl_loader import infer_text_config
from library.models.single_file import json_config_from_metadata, read_single_file
from library.models.tokenizers import find_tokenizer_folder, shipped_clip_tokenizer
from library.models.vae_config import count_indices, infer_autoencoder_kl_config

CONFIG_METADATA_KEY = "flux_config"
SINGLE_FILE_NAMES = {"transformer": "flux.safetensors", "ae": "ae.safetensors", "clip_l": "clip_l.safetensors",
                     "t5xxl": "t5xxl.safetensors"}
DIFFUSERS_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2")
FLUX_AE_SCALE, FLUX_AE_SHIFT = 0.3611, 0.1159
FLUX_AXES_DIMS_ROPE = (16, 56, 56)  # FLUX.1's rotary split of its 128-wide heads
CLIP_HEAD_DIM = 64
MAX_KEYS_IN_MESSAGE = 8


@dataclass
class FluxModels:
    transformer: FluxTransformer2DModel
    ae: AutoencoderKL
    clip_l: CLIPTextModel
    t5: T5EncoderModel
    tokenizer_clip: CLIPTokenizer
    tokenizer_t5: Any  # T5Tokenizer / T5TokenizerFast


# ----------------------------------------------------------------------------------------------------------------
def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_IN_MESSAGE])
    return shown + (f", ... ({len(keys) - MAX_KEYS_IN_MESSAGE} more)" if len(keys) > MAX_KEYS_IN_MESSAGE else "")




def _read(path: str | None, what: str, flag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path:
        raise ModelLoadError(f"{flag} is required with a single-file FLUX checkpoint (the {what} file)")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file ({flag}, the {what})")
    tensors, metadata = read_single_file(path, allow_pickle=False)
    return tensors, json_config_from_metadata(path, metadata, CONFIG_METADATA_KEY)


def default_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """FLUX.1's (16, 56, 56) for 128-wide heads; otherwise the same proportions in even sizes (16 -> 4, 6, 6)."""
    if head_dim == 128:
        return FLUX_AXES_DIMS_ROPE
    first = max(2, (head_dim // 4) // 2 * 2)
    rest = head_dim - first
    second = rest // 2 // 2 * 2
    return first, second, rest - second


def _load_module(path: str, what: str, model: torch.nn.Module, sd: dict[str, torch.Tensor], dtype: torch.dtype,
                 optional_missing: tuple[str, ...] = ()) -> None:
    """Load with a message naming the file, the missing/unexpected keys and how many."""
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(sd) - set(optional_missing))
    if missing:
        raise ModelLoadError(f"{path}: incomplete {what}: {len(missing)} key(s) missing: {_format_keys(missing)}")
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items() if k in expected}, strict=False, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path}: tensors do not fit the {what} layout inferred from the file: {exc}") from None
    model.eval()


# ----------------------------------------------------------------------------------------------------------------
# transformer
def _check_transformer_family(path: str, keys: set[str]) -> None:
    if any(k.startswith(("conditioner.embedders.", "model.diffusion_model.input_blocks.")) for k in keys):
        raise ModelLoadError(f"{path}: this is an SDXL checkpoint, not FLUX (it has conditioner/input_blocks keys)")
    if any(k.startswith("transformer_blocks.") for k in keys):
        raise ModelLoadError(f"{path}: this looks like a diffusers FluxTransformer2DModel file: pass the diffusers "
                             "folder (with model_index.json), or a BFL single file")
    stripped = flux_keys.strip_bfl_prefix({k: None for k in keys})  # type: ignore[misc]
    if not any(k.startswith(flux_keys.DOUBLE_BLOCKS[0] + ".") for k in stripped):
        raise ModelLoadError(f"{path}: not a FLUX transformer checkpoint: no 'double_blocks.*' keys "
                             f"(found e.g. {_format_keys(sorted(keys)[:3])})")


def infer_transformer_config(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """FluxTransformer2DModel config of a BFL state dict (without prefix)."""
    hidden = sd["img_in.weight"].shape[0]
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    config = {
        "patch_size": 1,
        "in_channels": sd["img_in.weight"].shape[1],
        "out_channels": sd["final_layer.linear.weight"].shape[0],
        "num_layers": flux_keys.count_blocks(sd, "double_blocks"),
        "num_single_layers": flux_keys.count_blocks(sd, "single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": sd["txt_in.weight"].shape[1],
        "pooled_projection_dim": sd["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        "axes_dims_rope": default_axes_dims(head_dim),
    }
    config.update(meta)
    config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
    return config


def load_flux_transformer(path: str, dtype: torch.dtype = torch.float32) -> FluxTransformer2DModel:
    """A BFL single-file FLUX transformer as diffusers' FluxTransformer2DModel."""
    tensors, meta = _read(path, "FLUX transformer", "--pretrained_model_name_or_path")
    _check_transformer_family(path, set(tensors))
    missing: list[str] = []
    unknown: list[str] = []
    sd = flux_keys.bfl_to_diffusers(tensors, missing, unknown)
    if missing:
        raise ModelLoadError(f"{path}: incomplete FLUX checkpoint: {len(missing)} key(s) missing: "
                             f"{_format_keys(missing)}")
    if unknown:
        raise ModelLoadError(f"{path}: {len(unknown)} key(s) this loader does not know (another FLUX variant?): "
                             f"{_format_keys(unknown)}")
    try:
        config = infer_transformer_config(flux_keys.strip_bfl_prefix(tensors), meta.get("transformer", {}))
        with init_empty_weights():
            model = FluxTransformer2DModel.from_config(config)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: cannot build a FLUX transformer from the file's shapes: {exc}") from None
    _load_module(path, "FLUX transformer", model, sd, dtype)
    return model


# ----------------------------------------------------------------------------------------------------------------
# autoencoder
def infer_ae_config(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL config of a diffusers-named FLUX autoencoder state dict (no quant convs)."""
    defaults = {
        "sample_size": 1024,
        "scaling_factor": FLUX_AE_SCALE,
        "shift_factor": FLUX_AE_SHIFT,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "force_upcast": True,
    }
    return infer_autoencoder_kl_config(
        sd, meta, latent_channels_key="decoder.conv_in.weight", latent_channels_dim=1, defaults=defaults,
        norm_num_groups=32,
    )


def load_flux_ae(path: str, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    tensors, meta = _read(path, "autoencoder", "--ae")
    if any(k.startswith(("double_blocks.", "model.diffusion_model.")) for k in tensors):
        raise ModelLoadError(f"{path}: this is a transformer checkpoint, not the FLUX autoencoder (ae.safetensors)")
    unknown: list[str] = []
    sd = flux_keys.ae_to_diffusers(tensors, unknown)
    if unknown:
        raise ModelLoadError(f"{path}: {len(unknown)} key(s) are not FLUX autoencoder keys: {_format_keys(unknown)}")
    try:
        config = infer_ae_config(sd, meta.get("ae", {}))
        with init_empty_weights():
            model = AutoencoderKL.from_config(config)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a FLUX autoencoder: cannot infer its config (missing {exc})") from None
    _load_module(path, "FLUX autoencoder", model, sd, dtype)
    return model


# ----------------------------------------------------------------------------------------------------------------
# text encoders
def load_clip_l(path: str, dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    """CLIP-L in the HF CLIPTextModel layout (`text_model.*`, with or without the wrapper)."""
    tensors, meta = _read(path, "CLIP-L text encoder", "--clip_l")
    sd = sdxl_keys.with_text_model_prefix({k: v for k, v in tensors.items() if not k.endswith("position_ids")})
    try:
        hidden = sd["text_model.embeddings.token_embedding.weight"].shape[1]
        values = {"num_attention_heads": max(1, hidden // CLIP_HEAD_DIM), "projection_dim": hidden}
        values.update(meta.get("clip_l", {}))
        config = infer_text_config(sd, "te1", values)
        with init_empty_weights():
            model = CLIPTextModel(config)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a CLIP text encoder in the HF CLIPTextModel layout "
                             f"(missing {exc})") from None
    _load_module(path, "CLIP-L text encoder", model, sdxl_keys.fit_text_encoder_keys(sd, model), dtype,
                 optional_missing=("text_model.embeddings.position_ids", "embeddings.position_ids"))
    return model


def infer_t5_config(sd: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> T5Config:
    """T5EncoderModel config of an HF-layout state dict: everything but a few constants is in the shapes."""
    bias = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = bias.shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight" if gated else
            "encoder.block.0.layer.1.DenseReluDense.wi.weight"]
    values = {
        "vocab_size": sd["shared.weight"].shape[0],
        "d_model": sd["shared.weight"].shape[1],
        "d_kv": sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        "d_ff": wi.shape[0],
        "num_layers": count_indices(sd, r"encoder\.block\.(\d+)\."),
        "num_heads": heads,
        "relative_attention_num_buckets": bias.shape[0],
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
        "tie_word_embeddings": False,
    }
    values.update(meta)
    return T5Config(**values)


def load_t5xxl(path: str, dtype: torch.dtype = torch.float32) -> T5EncoderModel:
    tensors, meta = _read(path, "T5-XXL text encoder", "--t5xxl")
    sd = dict(tensors)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    try:
        config = infer_t5_config(sd, meta.get("t5", {}))
        with init_empty_weights():
            model = T5EncoderModel(config)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a T5 encoder in the HF T5EncoderModel layout (missing {exc})") from None
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    _load_module(path, "T5 text encoder", model, sd, dtype)
    return model


# ----------------------------------------------------------------------------------------------------------------
# tokenizers
def load_flux_tokenizers(roots: list[str | None]) -> tuple[CLIPTokenizer, Any]:
    """CLIP from `<root>/tokenizer` or the shipped files; T5 from `<root>/tokenizer_2` (no PyPI package ships it)."""
    clip_dir = find_tokenizer_folder("tokenizer", roots)
    t5_dir = find_tokenizer_folder("tokenizer_2", roots)
    try:
        clip = CLIPTokenizer.from_pretrained(clip_dir) if clip_dir else shipped_clip_tokenizer()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{clip_dir}: cannot load the CLIP tokenizer: {exc}") from None
    if t5_dir is None:
        searched = [os.path.join(r, "tokenizer_2") for r in roots if r]
        raise ModelLoadError("no T5 tokenizer found (looked in " + (", ".join(searched) or "nothing") + "): give "
                             "--tokenizer_cache_dir DIR with DIR/tokenizer_2 holding the T5 tokenizer files "
                             "(tokenizer.json or spiece.model)")
    try:
        t5 = T5Tokenizer.from_pretrained(t5_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{t5_dir}: cannot load the T5 tokenizer: {exc}") from None
    return clip, t5


# ----------------------------------------------------------------------------------------------------------------
def _diffusers_component(path: str, sub: str, cls: Any, dtype: torch.dtype) -> Any:
    try:
        return cls.from_pretrained(path, subfolder=sub, torch_dtype=dtype).eval()
    except Exception as exc:  # noqa: BLE001 - library errors vary; the user needs the folder and the reason
        raise ModelLoadError(f"{os.path.join(path, sub)}: cannot load {cls.__name__}: {exc}") from None


def load_flux_files(path: str, *, ae: str | None = None, clip_l: str | None = None, t5xxl: str | None = None,
                    dtype: torch.dtype = torch.float32, tokenizer_cache_dir: str | None = None) -> FluxModels:
    """Load FLUX from a BFL single file, a folder of single files, or a diffusers FluxPipeline folder."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or folder (expected a FLUX .safetensors file or a diffusers "
                             "FluxPipeline folder)")
    overrides = {"ae": ae, "clip_l": clip_l, "t5xxl": t5xxl}
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        replaced = {"vae": ae, "text_encoder": clip_l, "text_encoder_2": t5xxl}
        missing = [s for s in DIFFUSERS_SUBFOLDERS if not os.path.isdir(os.path.join(path, s)) and not replaced.get(s)]
        if missing:
            raise ModelLoadError(f"{path}: not a FLUX diffusers folder: {len(missing)} sub-folder(s) missing: "
                                 f"{', '.join(missing)}")
        transformer = _diffusers_component(path, "transformer", FluxTransformer2DModel, dtype)
        vae = load_flux_ae(ae, dtype) if ae else _diffusers_component(path, "vae", AutoencoderKL, dtype)
        te1 = (load_clip_l(clip_l, dtype) if clip_l
               else _diffusers_component(path, "text_encoder", CLIPTextModel, dtype))
        te2 = load_t5xxl(t5xxl, dtype) if t5xxl else _diffusers_component(path, "text_encoder_2", T5EncoderModel, dtype)
        roots = [path, tokenizer_cache_dir]
    else:
        folder = path if os.path.isdir(path) else None
        if folder is not None:  # a folder of single files, as make_tiny_model writes it
            path = os.path.join(folder, SINGLE_FILE_NAMES["transformer"])
            if not os.path.isfile(path):
                raise ModelLoadError(f"{folder}: neither a diffusers folder (no model_index.json) nor a folder of "
                                     f"FLUX single files (no {SINGLE_FILE_NAMES['transformer']})")
            for key in ("ae", "clip_l", "t5xxl"):
                sibling = os.path.join(folder, SINGLE_FILE_NAMES[key])
                if not overrides[key] and os.path.isfile(sibling):
                    overrides[key] = sibling
        transformer = load_flux_transformer(path, dtype)
        vae = load_flux_ae(overrides["ae"], dtype)
        te1 = load_clip_l(overrides["clip_l"], dtype)
        te2 = load_t5xxl(overrides["t5xxl"], dtype)
        roots = [folder or os.path.dirname(os.path.abspath(path)), tokenizer_cache_dir]
    tok_clip, tok_t5 = load_flux_tokenizers(roots)
    return FluxModels(transformer, vae, te1, te2, tok_clip, tok_t5)


def load_flux(cfg: Any, dtype: torch.dtype = torch.float32) -> FluxModels:
    """Load from a FluxModelConfig (`--pretrained_model_name_or_path`, `--ae`, `--clip_l`, `--t5xxl`)."""
    flux = getattr(cfg, "flux", None)
    return load_flux_files(cfg.pretrained_model_name_or_path, ae=getattr(flux, "ae", None),
                           clip_l=getattr(flux, "clip_l", None), t5xxl=getattr(flux, "t5xxl", None), dtype=dtype,
                           tokenizer_cache_dir=getattr(cfg, "tokenizer_cache_dir", None))


# ----------------------------------------------------------------------------------------------------------------
# saving (single files in the layouts the loaders read)
def _save(sd: Mapping[str, torch.Tensor], path: str, config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {CONFIG_METADATA_KEY: json.dumps(config)} if config else None
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, path, metadata=meta)


def save_flux_single_files(models: FluxModels, folder: str) -> dict[str, str]:
    """Write flux.safetensors (BFL), ae.safetensors (BFL/LDM), clip_l.safetensors, t5xxl.safetensors (HF layouts).

    Config values that shapes cannot tell go into the `flux_config` metadata; returns the written paths.
    """
    paths = {k: os.path.join(folder, v) for k, v in SINGLE_FILE_NAMES.items()}
    tcfg = models.transformer.config
    _save(flux_keys.diffusers_to_bfl(models.transformer.state_dict()), paths["transformer"],
          {"transformer": {"axes_dims_rope": list(tcfg.axes_dims_rope)}})
    acfg = models.ae.config
    _save(flux_keys.diffusers_to_ae(models.ae.state_dict()), paths["ae"],
          {"ae": {"norm_num_groups": acfg.norm_num_groups, "sample_size": acfg.sample_size}})
    ccfg = models.clip_l.config
    _save(sdxl_keys.with_text_model_prefix(models.clip_l.state_dict()), paths["clip_l"],
          {"clip_l": {k: getattr(ccfg, k) for k in ("num_attention_heads", "hidden_act", "projection_dim",
                                                     "bos_token_id", "eos_token_id", "pad_token_id")}})
    t5cfg = models.t5.config
    t5_sd = {k: v for k, v in models.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    _save(t5_sd, paths["t5xxl"], {"t5": {"relative_attention_max_distance": t5cfg.relative_attention_max_distance,
                                         "layer_norm_epsilon": t5cfg.layer_norm_epsilon,
                                         "dense_act_fn": t5cfg.dense_act_fn}})
    return paths
