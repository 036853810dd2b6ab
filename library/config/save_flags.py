"""Flags of what a run writes: the network files, training state, metadata."""
from __future__ import annotations

from dataclasses import dataclass

from library.config.flags import flag


@dataclass
class SaveConfig:
    """saving"""

    output_dir: str = flag(None, "folder for the trained network and states", unset="output")
    output_name: str = flag(None, "file name of the network, without extension", unset="last")
    save_model_as: str | None = flag("safetensors", "file format of the network; only safetensors is written "
                                                    "(ckpt and pt are pickle formats: they are answered with a "
                                                    "warning and written as .safetensors)",
                                     choices=[None, "ckpt", "pt", "safetensors"], type=str)
    save_precision: str | None = flag(None, "dtype of the saved weights (default: as trained)",
                                      choices=[None, "float", "fp16", "bf16"], type=str)
    save_every_n_steps: int | None = flag(None, "also save the network every N steps")
    save_every_n_epochs: int | None = flag(None, "also save the network every N epochs")
    save_last_n_steps: int | None = flag(None, "accepted; step files older than this are kept (not yet removed)")
    save_state: bool = flag(False, "also save the optimizer, scheduler and RNG state beside each saved network, "
                                   "for --resume")
    save_state_on_train_end: bool = flag(False, "save the state once at the end of training")
    resume: str | None = flag(None, "continue from a state folder written by --save_state")
    no_metadata: bool = flag(False, "write no ss_* training metadata into the network file")
