"""How the frozen base model is spread over processes.

A LoRA is a few megabytes; the frozen base model it trains on (FLUX: 12B parameters, 24 GB in bf16) is what fills a
GPU. So the network is always replicated (its gradients averaged with one all-reduce, library/train/loop_math.py),
and the choice is only about the base model:

- replicated (the default, plain `accelerate launch --multi_gpu` or torchrun): every process holds all of it;
- sharded (an accelerate config with `distributed_type: FSDP`): the frozen model is split into FSDP2 units, one per
  transformer block plus the root, and each process keeps 1/N of every unit, all-gathering a block just before it
  runs (and again for the backward). Memory for the base model drops to about 1/N plus one block; the LoRA files
  and the training state stay exactly what a single process writes, because the network itself is not sharded.

accelerate's own FSDP path wraps whatever goes through `accelerator.prepare` and expects the trained parameters to
belong to that model; our network lives beside the base model, so the FSDP request is taken out of accelerate's
environment (accelerate then runs as plain multi-process) and applied here with `fully_shard`.

DeepSpeed ZeRO is refused with an error that points to the FSDP config: ZeRO-2 would shard only the LoRA's optimizer
state (megabytes), and ZeRO-3's sharding of the frozen model is what the FSDP config does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, MutableMapping

import torch
from torch import nn

from library.errors import UserError

_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class ShardingOptions:
    """The parts of an accelerate FSDP config that apply to a frozen model."""

    reshard_after_forward: bool = True  # FULL_SHARD; False = SHARD_GRAD_OP (keep gathered blocks until backward)
    offload_params: bool = False  # shards live in CPU memory and are copied in per block


def take_sharding_request(environ: MutableMapping[str, str] | None = None) -> ShardingOptions | None:
    """Read (and remove, so that accelerate does not wrap models itself) an FSDP request that `accelerate launch
    --config_file` put into the environment; None when there is none. Call before creating the Accelerator."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        raise UserError("DeepSpeed is not supported for network training: ZeRO-2 would only shard the network's "
                        "optimizer state (a few MB), and ZeRO-3's sharding of the frozen base model is what our FSDP "
                        "config does. Launch with configs/accelerate/fsdp_flux_lora.yaml instead (see docs/training.md)")
    if env.get("ACCELERATE_USE_FSDP", "").lower() not in _TRUE:
        return None
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if strategy in ("NO_SHARD", "3"):
        raise UserError("FSDP with sharding strategy NO_SHARD shards nothing: use a plain multi-GPU launch instead")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD")
    options = ShardingOptions(
        reshard_after_forward=(reshard.lower() in _TRUE) if reshard is not None
        else strategy not in ("SHARD_GRAD_OP", "2"),
        offload_params=env.get("FSDP_OFFLOAD_PARAMS", "false").lower() in _TRUE)
    for key in [k for k in env if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")]:
        del env[key]
    return options


def check_sharding_compatible(options: ShardingOptions | None, cfg) -> None:
    if options is None:
        return
    flux = getattr(cfg.model, "flux", None)
    if flux is not None and (flux.fp8_base or flux.blocks_to_swap):
        raise UserError("FSDP sharding cannot be combined with --fp8_base or --blocks_to_swap: sharding already "
                        "keeps only 1/N of the base model on each GPU; drop those flags")
    if cfg.validation.evaluates:
        raise UserError("--eval_* metrics generate images on the main process only, which a sharded base model "
                        "cannot do: drop the FSDP config or the --eval_* flags (validation loss works)")


def shard_frozen_model(model: nn.Module, units: Iterable[nn.Module], options: ShardingOptions) -> int:
    """FSDP2 `fully_shard` on each unit (a transformer block), then on the root (embedders, final layer); returns
    the number of units. The model must be frozen: only parameters without gradients are sharded here, so no
    reduce-scatter ever runs (the network's gradients are all-reduced separately)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if any(p.requires_grad for p in model.parameters()):
        raise UserError("FSDP sharding applies to the frozen base model only, but it has trainable parameters")
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if options.offload_params else OffloadPolicy()
    units = list(units)
    for unit in units:
        fully_shard(unit, reshard_after_forward=options.reshard_after_forward, offload_policy=offload)
    fully_shard(model, reshard_after_forward=options.reshard_after_forward, offload_policy=offload)
    return len(units)


def local_share(model: nn.Module) -> float:
    """Fraction of the model's parameter elements that this process holds (1.0 when not sharded)."""
    total = held = 0
    for p in model.parameters():
        total += p.numel()
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel()
    return held / max(total, 1)
