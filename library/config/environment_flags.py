"""Flags that describe the machine rather than the training (memory modes, retired options).

A config travels from a GPU box to a laptop and from older sd-scripts versions: such flags are accepted everywhere
and, where they cannot apply here, answered with one warning that says what happens instead; they never stop a run.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from library.config.flags import flag


@dataclass
class EnvironmentConfig:
    """machine and memory (accepted everywhere; a warning says when one cannot apply)"""

    lowram: bool = flag(False, "sd-scripts: load models to the GPU directly for machines with little RAM; here "
                               "models are loaded on the CPU and moved part by part anyway (a warning says so)")
    highvram: bool = flag(False, "sd-scripts: keep caches on the GPU instead of freeing memory; here nothing is "
                                 "freed between cache batches anyway (a warning says so)")
    disable_mmap_load_safetensors: bool = flag(False, "read .safetensors model files into memory in one go instead "
                                                      "of memory-mapping them (faster on WSL and some network "
                                                      "drives); applies to single-file checkpoints")
    cpu_offload_checkpointing: bool = flag(False, "with --gradient_checkpointing: keep the inputs that checkpointed "
                                                  "blocks save for the backward in CPU memory instead of on the GPU "
                                                  "(less GPU memory, more copying); not with --blocks_to_swap")


def environment_warnings(values: dict[str, object], cuda: bool) -> list[str]:
    """The warnings for machine flags that cannot apply here (one line each, said once per run)."""
    out = []
    if values.get("lowram"):
        out.append("--lowram: not needed here (models load on the CPU and move to the device part by part); "
                   "training goes on as without it")
    if values.get("highvram"):
        out.append("--highvram: " + ("no effect here (caching does not free GPU memory between batches); "
                                      "training goes on as without it" if cuda else
                                      "no CUDA GPU on this machine; training goes on without it"))
    if values.get("mem_eff_attn"):
        out.append("--mem_eff_attn: PyTorch SDPA attention is used (memory-efficient itself)")
    if values.get("save_model_as") in ("ckpt", "pt"):
        out.append(f"--save_model_as {values['save_model_as']}: pickle formats are not written (they can run code "
                   "when loaded); the network is saved as .safetensors")
    if values.get("cpu_offload_checkpointing") and not values.get("gradient_checkpointing"):
        out.append("--cpu_offload_checkpointing: only applies with --gradient_checkpointing (nothing is "
                   "checkpointed); training goes on without it")
    if values.get("cpu_offload_checkpointing") and values.get("gradient_checkpointing") and not cuda:
        out.append("--cpu_offload_checkpointing: no CUDA GPU on this machine, the saved inputs are on the CPU "
                   "already; training goes on as without it")
    if values.get("disable_mmap_load_safetensors") and _is_folder(values.get("pretrained_model_name_or_path")):
        out.append("--disable_mmap_load_safetensors: applies to single-file checkpoints; the diffusers folder "
                   f"{values['pretrained_model_name_or_path']} is read by diffusers as usual (the other model files "
                   "are read without mmap)")
    if values.get("xformers") and not _xformers_available():
        out.append("--xformers: xformers is not installed; PyTorch SDPA attention is used instead")
    return out


def _is_folder(path: object) -> bool:
    import os

    return isinstance(path, str) and os.path.isdir(path)


def _xformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("xformers") is not None


def warn_once(messages: list[str]) -> None:
    """Each warning once per process, on stderr whatever the logging setup (a user must see what a flag did not do)."""
    for m in messages:
        if m not in _SAID:
            _SAID.add(m)
            print(f"warning: {m}", file=sys.stderr, flush=True)


_SAID: set[str] = set()
