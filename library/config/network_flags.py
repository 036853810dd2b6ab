"""Flags of the trained network (LoRA / LoCon, or ControlNet-LLLite)."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import flag

LLLITE_ONLY = ("cond_emb_dim",)
# kohya network modules only (sd-scripts' train_network.py has them, its LLLite trainer does not)
NETWORK_MODULE_ONLY = ("base_weights", "base_weights_multiplier", "dim_from_weights")


@dataclass
class NetworkConfig:
    """network"""

    network_module: str | None = flag(None, "network module to train, e.g. networks.lora (the script's default when "
                                            "unset: networks.lora for SDXL, networks.lora_flux for FLUX)")
    network_dim: int | None = flag(None, "network rank (LoRA dimension)")
    network_alpha: float = flag(1, "LoRA alpha: the update is scaled by alpha / dim")
    network_dropout: float | None = flag(None, "dropout on the network's hidden activations (0 to 1)")
    network_args: list[str] = flag(None, "network options as key=value pairs, e.g. conv_dim=4 conv_alpha=1",
                                   unset=[])
    network_weights: str | None = flag(None, "start from these network weights")
    dim_from_weights: bool = flag(False, "take the network's rank, alpha and modules from --network_weights instead "
                                         "of --network_dim / --network_alpha / --network_args dims")
    base_weights: list[str] | None = flag(None, "network files (of --network_module's kind) merged into the frozen "
                                                "base model before the new network is created, in the order given")
    base_weights_multiplier: list[float] | None = flag(None, "strength of each --base_weights file, in the same "
                                                             "order (a file without one gets 1.0)")
    network_train_unet_only: bool = flag(False, "train only the U-Net / transformer part of the network")
    network_train_text_encoder_only: bool = flag(False, "train only the text-encoder part of the network")
    unet_lr: float | None = flag(None, "learning rate of the U-Net / transformer part (default: --learning_rate)")
    text_encoder_lr: list[float] | None = flag(None, "learning rate of the text-encoder part: one value, or one per "
                                                     "text encoder (default: --learning_rate)")
    training_comment: str | None = flag(None, "comment stored in the network file's metadata")
    scale_weight_norms: float | None = flag(None, "after each optimizer step, scale down every network module whose "
                                                  "update norm exceeds this (max-norm regularization; 1 is common)")
    # ControlNet-LLLite only
    cond_emb_dim: int | None = flag(None, "ControlNet-LLLite: width of the conditioning-image embedding (unset: 32)")
