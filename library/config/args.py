"""Command-line argument groups, one function per concern, with sd-scripts' flag names.

Scripts compose the groups they need; the namespace is turned into typed configs by
library.config.train_config and goes no further than that.
"""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, required=False, default=None,
                   help="single-file .safetensors checkpoint or diffusers folder")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None, help="folder with tokenizer files")
    g.add_argument("--allow_pickle", action="store_true", help="allow loading pickled .ckpt/.pt files (unsafe)")
    g.add_argument("--vae", type=str, default=None, help="separate VAE (single file or diffusers folder)")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in fp32 under mixed precision")
    g.add_argument("--v_parameterization", action="store_true", help="v-prediction model")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset_config", type=str, default=None, help="TOML dataset config ([general]/[[datasets]])")
    g.add_argument("--max_data_loader_n_workers", type=int, default=0, help="accepted for compatibility")
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="accepted for compatibility")


def add_caching_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("caching")
    g.add_argument("--cache_latents", action="store_true", help="encode images once with the VAE and keep latents")
    g.add_argument("--cache_latents_to_disk", action="store_true", help="store latent caches beside the images")
    g.add_argument("--vae_batch_size", type=int, default=1)
    g.add_argument("--cache_text_encoder_outputs", action="store_true")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true")
    g.add_argument("--text_encoder_cache_dir", type=str, default=None,
                   help="folder for text-encoder caches (default: <output_dir>/te_cache)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default="output")
    g.add_argument("--output_name", type=str, default="last")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--full_bf16", action="store_true", help="keep trainable weights and gradients in bf16")
    g.add_argument("--full_fp16", action="store_true", help="keep trainable weights and gradients in fp16")
    g.add_argument("--noise_offset", type=float, default=None)
    g.add_argument("--min_snr_gamma", type=float, default=None)
    g.add_argument("--min_timestep", type=int, default=0)
    g.add_argument("--max_timestep", type=int, default=1000)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--sdpa", action="store_true", help="use PyTorch SDPA attention (the default)")
    g.add_argument("--xformers", action="store_true", help="use xformers attention (optional extra)")
    g.add_argument("--sdpa_cudnn", action="store_true",
                   help="let training use cuDNN's SDPA kernel (off by default: its backward gave NaN gradients on "
                        "Hopper GPUs, see library/train/attention.py)")
    g.add_argument("--mem_eff_attn", action="store_true", help="accepted for compatibility; SDPA is used")
    g.add_argument("--lowram", action="store_true", help="accepted for compatibility")


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", type=str, default="AdamW",
                   help="AdamW, AdamW8bit, Lion, Lion8bit, Prodigy, Adafactor, SGDNesterov, or module.Class")
    g.add_argument("--optimizer_args", type=str, nargs="*", default=[], help="key=value pairs")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", type=str, default="constant")
    g.add_argument("--lr_warmup_steps", type=float, default=0, help="steps, or a fraction (<1) of the total")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    g.add_argument("--lr_scheduler_power", type=float, default=1.0)


def add_network_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--network_module", type=str, default="networks.lora")
    g.add_argument("--network_dim", type=int, default=None)
    g.add_argument("--network_alpha", type=float, default=1.0)
    g.add_argument("--network_dropout", type=float, default=None)
    g.add_argument("--network_args", type=str, nargs="*", default=[], help="key=value pairs")
    g.add_argument("--network_weights", type=str, default=None, help="continue from these weights")
    g.add_argument("--network_train_unet_only", action="store_true")
    g.add_argument("--network_train_text_encoder_only", action="store_true")
    g.add_argument("--unet_lr", type=float, default=None)
    g.add_argument("--text_encoder_lr", type=float, default=None)
    g.add_argument("--training_comment", type=str, default=None)


def add_saving_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("saving")
    g.add_argument("--save_model_as", choices=["safetensors"], default="safetensors",
                   help="only safetensors is written (pickle formats are unsafe to share)")
    g.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None)
    g.add_argument("--save_every_n_steps", type=int, default=None)
    g.add_argument("--save_every_n_epochs", type=int, default=None)
    g.add_argument("--save_last_n_steps", type=int, default=None, help="accepted; older step files are kept")
    g.add_argument("--save_state", action="store_true", help="also save optimizer/scheduler/RNG state for --resume")
    g.add_argument("--save_state_on_train_end", action="store_true")
    g.add_argument("--resume", type=str, default=None, help="state folder written by --save_state")
    g.add_argument("--no_metadata", action="store_true")


def add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--logging_dir", type=str, default=None, help="TensorBoard log folder")
    g.add_argument("--log_with", choices=["tensorboard", "wandb", "all"], default=None)
    g.add_argument("--log_prefix", type=str, default=None)
    g.add_argument("--loss_log_file", type=str, default=None,
                   help="write per-step losses as JSON lines (used by regression tests)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt), one prompt per line")
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    g.add_argument("--sample_every_n_epochs", type=int, default=None)
    g.add_argument("--sample_at_first", action="store_true")
    g.add_argument("--sample_sampler", type=str, default="euler_a")


def add_validation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation and evaluation (held-out split: validation_split in the dataset config)")
    g.add_argument("--validate_every_n_steps", type=int, default=None, help="validation loss every N steps")
    g.add_argument("--validate_every_n_epochs", type=int, default=None, help="validation loss every N epochs")
    g.add_argument("--eval_every_n_steps", type=int, default=None,
                   help="sample the prompts and score DINO / CLIP-I / CLIP-T against the held-out images")
    g.add_argument("--eval_dino_model", type=str, default=None, help="local transformers folder of a DINO/DINOv2 ViT")
    g.add_argument("--eval_clip_model", type=str, default=None, help="local transformers folder of a CLIP model")
    g.add_argument("--eval_rare_token", type=str, default=None, help="token removed from prompts for CLIP-T")


def add_config_file_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config file")
    g.add_argument("--config_file", type=str, default=None, help="TOML with argument values (flags override)")
    g.add_argument("--output_config", action="store_true", help="write the arguments to --config_file and exit")


def build_train_parser(description: str) -> argparse.ArgumentParser:
    """The flags every trainer shares; scripts add their family- and network-specific ones."""
    p = argparse.ArgumentParser(description=description)
    for add in (add_config_file_args, add_model_args, add_dataset_args, add_caching_args, add_training_args,
                add_optimizer_args, add_saving_args, add_logging_args, add_sampling_args, add_validation_args):
        add(p)
    return p
