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

DeepSpeed ZeRO through an accelerate config is refused with an error that points to the FSDP config: ZeRO-2 would
shard only the LoRA's optimizer state (megabytes), and ZeRO-3's sharding of the frozen model is what the FSDP config
does. sd-scripts' command-line form (`--deepspeed --zero_stage 3`, library/config/distributed_flags.py) is mapped to
that FSDP sharding (`deepspeed_sharding`); lower stages run replicated. Both say so in one warning.

The process group itself gets sd-scripts' DDP options (`accelerator_kwargs_handlers`): `--ddp_timeout` is its
timeout; `--ddp_gradient_as_bucket_view` / `--ddp_static_graph` are handed over as sd-scripts does, though no module
is wrapped in DDP here (a warning says so).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, MutableMapping

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


def accelerator_kwargs_handlers(dcfg: Any, cuda: bool) -> list[Any]:
    """The kwargs handlers sd-scripts gives its Accelerator for the DDP flags (`dcfg`: a DistributedConfig, or None):
    the process-group timeout (--ddp_timeout, minutes) and DDP's options, each only when given. No backend is named:
    accelerate picks it (a named backend would make a single process try to join a group)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list[Any] = []
    if dcfg is None:
        return handlers
    if dcfg.ddp_timeout:
        timeout = datetime.timedelta(minutes=dcfg.ddp_timeout)
        if not cuda and timeout == datetime.timedelta(minutes=10):
            # accelerate passes on only values that differ from its NCCL default (10 minutes); gloo's own default is
            # 30, so 10 minutes must differ by a microsecond to reach a gloo group
            timeout += datetime.timedelta(microseconds=1)
        handlers.append(InitProcessGroupKwargs(timeout=timeout))
    if dcfg.ddp_gradient_as_bucket_view or dcfg.ddp_static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=dcfg.ddp_gradient_as_bucket_view,
                                                      static_graph=dcfg.ddp_static_graph))
    return handlers


def deepspeed_sharding(cfg: Any) -> ShardingOptions | None:
    """`--deepspeed --zero_stage 3` as FSDP sharding of the frozen base model (ZeRO-3 partitions the parameters;
    --offload_param_device cpu/nvme: the shards live in CPU memory); None for lower stages or without --deepspeed.
    Where sharding cannot combine with the run's other flags, the base model stays whole (with a warning) rather
    than stopping a config sd-scripts would train."""
    from library.config.environment_flags import warn_once

    dcfg = getattr(cfg, "distributed", None)
    if dcfg is None or not dcfg.deepspeed or dcfg.zero_stage != 3:
        return None
    options = ShardingOptions(reshard_after_forward=True, offload_params=bool(dcfg.offload_param_device))
    try:
        check_sharding_compatible(options, cfg)
    except UserError as e:
        warn_once([f"--deepspeed --zero_stage 3: the base model is not sharded ({e})"])
        return None
    return options


def check_sharding_compatible(options: ShardingOptions | None, cfg) -> None:
    if options is None:
        return
    flux = getattr(cfg.model, "flux", None)
    fp8 = getattr(cfg.model, "fp8_base", False) or getattr(cfg.model, "fp8_base_unet", False)  # any family
    if fp8 or (flux is not None and (flux.fp8_base or flux.blocks_to_swap)):
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
