"""Multi-process flags with sd-scripts' names: DDP options and the DeepSpeed ZeRO options.

How they apply here (library/train/scale_out.py): the network is not wrapped in DDP (its gradients are averaged with
one all-reduce, library/train/loop_math.py), so of the DDP flags only the process-group timeout changes anything;
the other two are handed to accelerate as sd-scripts does and answered with one warning. DeepSpeed is not used:
ZeRO-1/2 would shard only the network's optimizer state and gradients (a few MB, replicated here), and ZeRO-3's
sharding of the frozen base model is what the FSDP path does, so `--deepspeed --zero_stage 3` shards the base model
with FSDP (with `--offload_param_device`: shards kept in CPU memory) and says so in one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from library.config.flags import flag

OFFLOAD_DEVICES = (None, "cpu", "nvme")


@dataclass
class DistributedConfig:
    """multi-process training (DDP and DeepSpeed flags; DeepSpeed ZeRO-3 runs as FSDP sharding here)"""

    ddp_timeout: int | None = flag(None, "timeout of the process group in minutes (unset: accelerate's default, "
                                         "10 minutes with NCCL, 30 with gloo)")
    ddp_gradient_as_bucket_view: bool = flag(False, "DDP's gradient_as_bucket_view, handed to accelerate; the "
                                                    "network is not wrapped in DDP here, so it changes nothing "
                                                    "(a warning says so)")
    ddp_static_graph: bool = flag(False, "DDP's static_graph, handed to accelerate; the network is not wrapped in "
                                         "DDP here, so it changes nothing (a warning says so)")
    deepspeed: bool = flag(False, "sd-scripts: train with DeepSpeed. Here: ZeRO stage 3 shards the frozen base "
                                  "model over the processes with FSDP; stages 0-2 run as plain multi-process "
                                  "training (they would shard only the network's small optimizer state)")
    zero_stage: int = flag(2, "DeepSpeed ZeRO stage (with --deepspeed): 3 shards the frozen base model (FSDP here)",
                           choices=(0, 1, 2, 3))
    offload_optimizer_device: str | None = flag(None, "DeepSpeed: where the optimizer state lives (none|cpu|nvme). "
                                                      "Here the network's optimizer state stays on the device (a "
                                                      "warning says so)", choices=OFFLOAD_DEVICES)
    offload_optimizer_nvme_path: str | None = flag(None, "DeepSpeed: NVMe folder for an offloaded optimizer state "
                                                         "(not used here; a warning says so)")
    offload_param_device: str | None = flag(None, "DeepSpeed ZeRO-3: where parameter shards live (none|cpu|nvme); "
                                                  "here cpu or nvme keep the base model's FSDP shards in CPU memory",
                                            choices=OFFLOAD_DEVICES)
    offload_param_nvme_path: str | None = flag(None, "DeepSpeed ZeRO-3: NVMe folder for offloaded parameters (here "
                                                     "shards stay in CPU memory; a warning says so)")
    zero3_init_flag: bool = flag(False, "DeepSpeed ZeRO-3: build huge models already sharded (deepspeed.zero.Init). "
                                        "Here models load on the CPU and are sharded once loaded (a warning says so)")
    zero3_save_16bit_model: bool = flag(False, "DeepSpeed ZeRO-3: gather a 16-bit model to save. Here the saved "
                                               "network is always whole, in --save_precision (a warning says so)")
    fp16_master_weights_and_gradients: bool = flag(False, "DeepSpeed ZeRO-2 with CPU Adam: keep fp16 master "
                                                          "weights and gradients. Here the network keeps fp32 "
                                                          "weights (fp16 with --full_fp16; a warning says so)")


DDP_ONLY_FLAGS = ("ddp_gradient_as_bucket_view", "ddp_static_graph")


def distributed_warnings(values: Mapping[str, object]) -> list[str]:
    """One line per flag whose feature is done another way here (said once per run)."""
    out = []
    given = [f"--{n}" for n in DDP_ONLY_FLAGS if values.get(n)]
    if given:
        out.append(f"{' / '.join(given)}: the network is not wrapped in DDP here (its gradients are averaged with one "
                   "all-reduce after the backward), so there are no DDP buckets or graph to configure; training "
                   "goes on as without it")
    if values.get("fp16_master_weights_and_gradients"):
        out.append("--fp16_master_weights_and_gradients: a DeepSpeed ZeRO-2 CPU-Adam option; DeepSpeed is not used "
                   "here, the network keeps fp32 master weights and gradients (fp16 only with --full_fp16)")
    deepspeed_given = [f"--{n}" for n in ("zero3_init_flag", "zero3_save_16bit_model", "offload_optimizer_device",
                                          "offload_optimizer_nvme_path", "offload_param_device",
                                          "offload_param_nvme_path") if values.get(n)]
    if not values.get("deepspeed"):
        if deepspeed_given:
            out.append(f"{', '.join(deepspeed_given)}: DeepSpeed options without --deepspeed have no effect "
                       "(as in sd-scripts); training goes on as without them")
        return out
    stage = values.get("zero_stage", 2)
    if stage == 3:
        offload = values.get("offload_param_device")
        out.append("--deepspeed --zero_stage 3: DeepSpeed is not used; the frozen base model is sharded over the "
                   "processes with FSDP instead (the same memory: about 1/N of it per process"
                   + (", shards kept in CPU memory" if offload else "") + "); the network is replicated")
        if offload == "nvme" or values.get("offload_param_nvme_path"):
            out.append("--offload_param_device nvme / --offload_param_nvme_path: parameters are not offloaded to "
                       "NVMe; the base model's shards are kept in CPU memory instead")
        if values.get("zero3_init_flag"):
            out.append("--zero3_init_flag: models load whole on the CPU and are sharded once loaded")
        if values.get("zero3_save_16bit_model"):
            out.append("--zero3_save_16bit_model: nothing to gather; the network is saved whole, in --save_precision")
    else:
        out.append(f"--deepspeed --zero_stage {stage}: DeepSpeed is not used; ZeRO-{stage} would shard only the "
                   "network's optimizer state and gradients (a few MB), so training runs as plain multi-process "
                   "(or single-process) training with them replicated")
        for name in ("offload_param_device", "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model"):
            if values.get(name):
                out.append(f"--{name}: a ZeRO stage 3 option; with --zero_stage {stage} it has no effect "
                           "(as in DeepSpeed)")
    if values.get("offload_optimizer_device") or values.get("offload_optimizer_nvme_path"):
        out.append("--offload_optimizer_device / --offload_optimizer_nvme_path: the network's optimizer state "
                   "(a few MB) stays on the training device")
    return out
