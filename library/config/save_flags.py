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
    save_n_epoch_ratio: int | None = flag(None, "save about N times over the run (every floor(epochs / N) epochs, "
                                                "at least every epoch); overrides --save_every_n_epochs")
    save_last_n_epochs: int | None = flag(None, "keep only the last N epoch saves: each epoch save removes the one N "
                                                "saves before it")
    save_last_n_epochs_state: int | None = flag(None, "keep only the last N epoch state folders (default: "
                                                      "--save_last_n_epochs)")
    save_last_n_steps: int | None = flag(None, "keep step saves of the last N steps: each step save removes the one "
                                               "that fell out of that window")
    save_last_n_steps_state: int | None = flag(None, "the same for step state folders (default: --save_last_n_steps)")
    save_state: bool = flag(False, "also save the optimizer, scheduler and RNG state beside each saved network, "
                                   "for --resume")
    save_state_on_train_end: bool = flag(False, "save the state once at the end of training")
    resume: str | None = flag(None, "continue from a state folder written by --save_state")
    no_metadata: bool = flag(False, "write no ss_* training metadata into the network file")
    initial_epoch: int | None = flag(None, "number the epochs from this one (1-based) as if training had run before; "
                                           "with --skip_until_initial_step its steps are skipped")
    initial_step: int | None = flag(None, "start counting optimizer steps here (overrides --initial_epoch and the "
                                          "step of a --resume state)")
    skip_until_initial_step: bool = flag(False, "skip the batches before --initial_step / --initial_epoch so the run "
                                                "continues with the data it would have seen")
    # model card metadata, written as the modelspec.* keys
    metadata_title: str | None = flag(None, "modelspec.title (default: the output name)")
    metadata_author: str | None = flag(None, "modelspec.author")
    metadata_description: str | None = flag(None, "modelspec.description")
    metadata_license: str | None = flag(None, "modelspec.license")
    metadata_tags: str | None = flag(None, "modelspec.tags, comma separated")
    metadata_trigger_phrase: str | None = flag(None, "modelspec.trigger_phrase: the words that call up what was "
                                                     "trained")
    metadata_usage_hint: str | None = flag(None, "modelspec.usage_hint")
    metadata_merged_from: str | None = flag(None, "modelspec.merged_from: the models this one was merged from")
    metadata_preprocessor: str | None = flag(None, "modelspec.preprocessor")
    metadata_is_negative_embedding: str | None = flag(None, "modelspec.is_negative_embedding")
    metadata_thumbnail: str | None = flag(None, "modelspec.thumbnail (a data: URL)")
