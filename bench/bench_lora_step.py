"""One SDXL LoRA training step: ours (networks.lora) against plain diffusers + PEFT, on the same U-Net and batch.

    python bench/bench_lora_step.py --model tiny|sdxl-arch --resolution 256 --batch_size 1 --rank 16 --steps 5 \
        --warmup 2 [--gradient_checkpointing] [--dtype fp32|bf16] [--device cpu|cuda] [--json out.json]

Each variant runs in its own subprocess (this script with `--variant ours|peft`), so that its peak memory is its own
and the full-size U-Net (about 10 GiB in fp32) never sits in memory twice. Both subprocesses build the U-Net from the
same seed (identical weights: the JSON records a checksum of each) and draw the same batch and the same per-step noise
and timesteps, so their first-step losses must agree (both adapters start as an exact no-op): the JSON records both.

The step timed is what a trainer does per optimisation step: forward (with SDXL's text/pooled/time-id conditioning),
MSE loss, backward, gradient clipping, AdamW step, zero_grad. Data loading and text encoding are not included (both
trainers cache them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable as a script from anywhere

VARIANTS = ("ours", "peft")
ATTENTION_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")  # the PEFT target set of diffusers' SDXL LoRA example
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0  # the default of both sd-scripts and the diffusers example
DTYPE_NAMES = ("fp32", "bf16")

# The published SDXL base U-Net config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), as a table so no
# download is needed; the weights are random.
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    norm_num_groups=32,
    norm_eps=1e-5,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)
TOKENS = 77  # CLIP context length: SDXL's text states are (batch, 77, 2048)


@dataclass(frozen=True)
class BenchConfig:
    model: str
    resolution: int
    batch_size: int
    rank: int
    steps: int
    warmup: int
    gradient_checkpointing: bool
    dtype: str
    device: str
    seed: int
    ours_targets: str


# --------------------------------------------------------------------------------------------------------------------
# Model and batch (identical in both subprocesses)
# --------------------------------------------------------------------------------------------------------------------


def unet_config(model: str) -> dict[str, Any]:
    from library.models.tiny_configs import TINY_SDXL_UNET

    return dict(TINY_SDXL_UNET) if model == "tiny" else dict(SDXL_UNET_CONFIG)


def build_unet(cfg: BenchConfig):
    """A randomly initialised U-Net; the seed alone decides the weights, so both subprocesses get the same ones."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(cfg.seed)
    # On CUDA the random init runs on the GPU (minutes faster for the full U-Net); both variants use the same device,
    # so they still get the same weights.
    with torch.device(cfg.device):
        unet = UNet2DConditionModel(**unet_config(cfg.model))
    unet.requires_grad_(False)
    return unet


def weights_checksum(module) -> float:
    """A cheap fingerprint of the base weights, to show both variants started from the same U-Net."""
    import torch

    with torch.no_grad():
        return float(sum(p.double().sum().item() for p in module.parameters()))


def make_batch(cfg: BenchConfig, config: dict[str, Any]) -> dict[str, Any]:
    """Random latents, text states, pooled embedding and size ids, plus per-step noise and timesteps (fixed seed)."""
    import torch

    from library.families import noise as noise_lib
    from library.families.sdxl import size_condition_ids

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    b, side = cfg.batch_size, cfg.resolution // 8
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    sizes = [(cfg.resolution, cfg.resolution)] * b
    batch = SimpleNamespace(original_sizes=sizes, crop_top_lefts=[(0, 0)] * b, target_sizes=sizes)
    out = {
        "latents": torch.randn((b, config["in_channels"], side, side), generator=gen),
        "encoder_hidden_states": torch.randn((b, TOKENS, config["cross_attention_dim"]), generator=gen),
        "pooled": torch.randn((b, pooled_dim), generator=gen),
        "time_ids": size_condition_ids(batch),
        "size_batch": batch,
        "noise": [], "timesteps": [],
    }
    for _ in range(cfg.warmup + cfg.steps):
        out["noise"].append(noise_lib.sample_noise(out["latents"], gen, None))
        out["timesteps"].append(noise_lib.sample_timesteps(b, gen, 0, 1000, torch.device("cpu")))
    return out


# --------------------------------------------------------------------------------------------------------------------
# The two adapters
# --------------------------------------------------------------------------------------------------------------------


def attention_module_ids(unet) -> set[int]:
    """The Linear layers PEFT's target_modules=["to_q","to_k","to_v","to_out.0"] selects (name-suffix match)."""
    return {id(m) for name, m in unet.named_modules() if any(name.endswith("." + t) for t in ATTENTION_LAYERS)}


def lora_param_count(in_features: int, out_features: int, rank: int) -> int:
    return rank * (in_features + out_features)


def default_target_params(unet, rank: int) -> tuple[int, int]:
    """(modules, trainable parameters) of networks.lora's default U-Net target set at this rank, without building it."""
    from torch import nn

    from networks.lora import collect_targets

    _, targets = collect_targets([], unet, include_conv=False)
    total = 0
    for t in targets:
        m = t.module
        if isinstance(m, nn.Linear):
            total += lora_param_count(m.in_features, m.out_features, rank)
        else:  # 1x1 conv (proj_in/proj_out without linear projection)
            total += lora_param_count(m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels, rank)
    return len(targets), total


def setup_ours(unet, cfg: BenchConfig) -> tuple[Any, list[dict[str, Any]], int]:
    """networks.lora on the U-Net only (rank r, alpha r). Returns (network, optimizer groups, modules wrapped).

    `create_network` always wraps every Linear of the transformer blocks (ff and proj_in/out too). To compare like
    with like, `--ours_targets attn` builds the same `LoRANetwork` restricted, through its `modules_dim` table, to the
    attention projections PEFT targets; `--ours_targets all` uses `create_network` as sd-scripts users do.
    """
    import torch

    from networks.lora import LoRANetwork, collect_targets, create_network

    if cfg.ours_targets == "all":
        network = create_network(1.0, cfg.rank, cfg.rank, None, None, unet)
    else:
        wanted = attention_module_ids(unet)
        _, targets = collect_targets([], unet, include_conv=False)
        dims = {t.name: cfg.rank for t in targets if id(t.module) in wanted}
        network = LoRANetwork(None, unet, multiplier=1.0, modules_dim=dims, modules_alpha=dict(dims))
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.to(cfg.device, torch.float32)  # LoRA weights stay fp32 under bf16 autocast, as our trainer keeps them
    network.prepare_grad_etc(None, unet)
    network.train()
    groups, _ = network.prepare_optimizer_params(None, LEARNING_RATE, LEARNING_RATE)
    return network, groups, len(network.unet_loras)


def setup_peft(unet, cfg: BenchConfig) -> tuple[list[Any], int]:
    """PEFT LoRA via `unet.add_adapter`, as diffusers' train_text_to_image_lora_sdxl.py does.

    Returns (trainable params, LoRA layers made)."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                        target_modules=list(ATTENTION_LAYERS))
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # fp32 trainable weights, as the example's cast_training_params does under mixed precision
        p.data = p.data.to(torch.float32)
    modules = sum(1 for m in unet.modules() if isinstance(m, LoraLayer))
    return params, modules


# --------------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_cpu_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux clear_refs '5'), so the peak covers only the timed steps."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_mib() -> float:
    kib = _proc_status_kib("VmHWM")
    if kib is None:  # not Linux: the process-lifetime peak (KiB on Linux, bytes on macOS)
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kib //= 1024
    return kib / 1024


def cpu_rss_mib() -> float:
    kib = _proc_status_kib("VmRSS")
    return (kib or 0) / 1024


# --------------------------------------------------------------------------------------------------------------------
# One variant (runs in its own process)
# --------------------------------------------------------------------------------------------------------------------


def run_variant(cfg: BenchConfig, variant: str) -> dict[str, Any]:
    """Build, adapt, train `warmup + steps` steps; return timings, memory, losses and parameter counts."""
    import torch
    import torch.nn.functional as F

    from library.families import noise as noise_lib
    from library.families.interface import NoisyInput
    from library.config.training_flags import TrainingConfig
    from library.families.sdxl import SDXLFamily, SDXLFamilyModels
    from library.train.loss_step import compute_loss

    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    t_setup = time.perf_counter()
    unet = build_unet(cfg)
    config = dict(unet.config)
    checksum = weights_checksum(unet)
    base_params = sum(p.numel() for p in unet.parameters())
    default_modules, default_params = default_target_params(unet, cfg.rank)
    data = make_batch(cfg, config)
    unet.to(device, dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in train mode (our trainer does the same)
    else:
        unet.eval()

    if variant == "ours":
        network, params, modules = setup_ours(unet, cfg)
        trainable = sum(p.numel() for g in params for p in g["params"])
        clip_params = list(network.parameters())
    else:
        params, modules = setup_peft(unet, cfg)
        trainable = sum(p.numel() for p in params)
        clip_params = params
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

    latents = data["latents"].to(device, dtype)
    hidden = data["encoder_hidden_states"].to(device, dtype)
    pooled = data["pooled"].to(device, dtype)
    time_ids = data["time_ids"].to(device, dtype)
    family = SDXLFamily()
    models = SDXLFamilyModels(denoiser=unet, vae=torch.nn.Identity())  # the step gets latents: no VAE runs
    alphas = family.alphas_cumprod
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    training = TrainingConfig()  # the trainer's defaults: l2 loss, no mask, no weighting

    def loss_ours(noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Trainer._loss's compute_loss: SDXLFamily.predict (pooled + size ids as added_cond_kwargs), the l2 loss in
        # fp32; the noise and timesteps are the fixed draws both variants share
        inp = NoisyInput(noisy=noise_lib.add_noise(latents, noise, t, alphas), noise=noise, timesteps=t)
        return compute_loss(family, models, training, data["size_batch"], latents,
                            {"encoder_hidden_states": hidden, "pooled": pooled}, inp=inp, autocast=lambda: autocast)

    def loss_peft(noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # train_text_to_image_lora_sdxl.py: unet(noisy, t, prompt_embeds, added_cond_kwargs), F.mse_loss in fp32
        noisy = noise_lib.add_noise(latents, noise, t, alphas)
        with autocast:
            pred = unet(noisy, t, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")

    loss_fn = loss_ours if variant == "ours" else loss_peft
    setup_s = time.perf_counter() - t_setup

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated() / 2 ** 20
        peak_scope = "timed steps"
    else:
        mem_before = cpu_rss_mib()
        peak_scope = "timed steps" if reset_cpu_peak() else "process lifetime"

    times, losses = [], []
    for i in range(cfg.warmup + cfg.steps):
        noise = data["noise"][i].to(device, dtype)
        t = data["timesteps"][i].to(device)
        sync()
        start = time.perf_counter()
        loss = loss_fn(noise, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip_params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach().item()))

    timed = times[cfg.warmup:]
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else cpu_peak_mib()
    return {
        "variant": variant,
        "ran": True,
        "lora_modules": modules,
        "trainable_params": trainable,
        "base_params": base_params,
        "default_target_modules_ours": default_modules,
        "default_target_params_ours": default_params,
        "weights_checksum": checksum,
        "setup_s": setup_s,
        "step_times_s": times,
        "median_step_s": statistics.median(timed) if timed else None,
        "min_step_s": min(timed) if timed else None,  # less sensitive to other load on a shared machine
        "losses": losses,
        "memory_before_steps_mib": mem_before,
        "peak_memory_mib": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "RSS high-water mark",
        "peak_memory_scope": peak_scope,
    }


# --------------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per variant, then the comparison
# --------------------------------------------------------------------------------------------------------------------


def variant_command(cfg: BenchConfig, variant: str, json_path: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--json", json_path,
           "--model", cfg.model, "--resolution", str(cfg.resolution), "--batch_size", str(cfg.batch_size),
           "--rank", str(cfg.rank), "--steps", str(cfg.steps), "--warmup", str(cfg.warmup), "--dtype", cfg.dtype,
           "--device", cfg.device, "--seed", str(cfg.seed), "--ours_targets", cfg.ours_targets]
    if cfg.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    return cmd


def spawn_variant(cfg: BenchConfig, variant: str, timeout: float | None) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; a crash or out-of-memory kill is recorded, not raised."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{variant}.json")
        try:
            proc = subprocess.run(variant_command(cfg, variant, path), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "ran": False, "reason": f"timed out after {timeout} s"}
        if proc.returncode == 0 and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        reason = f"exit code {proc.returncode}"
        if proc.returncode in (-9, 137):
            reason += " (killed: most likely out of memory)"
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        return {"variant": variant, "ran": False, "reason": reason, "stderr_tail": tail}


def machine_info(device: str) -> dict[str, Any]:
    """Versions from package metadata, so the parent process does not pay for importing torch and diffusers."""
    from importlib import metadata

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    for package in ("torch", "diffusers", "peft"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    try:
        info["load_average_1m"] = os.getloadavg()[0]  # other work on the machine skews CPU timings
    except OSError:
        pass
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios ours/reference and the sanity checks that both ran the same problem."""
    ours, ref = results.get("ours", {}), results.get("peft", {})
    if not (ours.get("ran") and ref.get("ran")):
        return {}
    out = {
        "step_time_ours_over_peft": _ratio(ours["median_step_s"], ref["median_step_s"]),
        "min_step_time_ours_over_peft": _ratio(ours.get("min_step_s"), ref.get("min_step_s")),
        "peak_memory_ours_over_peft": _ratio(ours["peak_memory_mib"], ref["peak_memory_mib"]),
        "trainable_params_ours_over_peft": _ratio(ours["trainable_params"], ref["trainable_params"]),
        "same_base_weights": ours["weights_checksum"] == ref["weights_checksum"],
        "same_target_modules": ours["lora_modules"] == ref["lora_modules"],
    }
    if ours["losses"] and ref["losses"]:
        out["first_loss_abs_diff"] = abs(ours["losses"][0] - ref["losses"][0])
    return out


def format_table(cfg: BenchConfig, results: dict[str, dict[str, Any]], comparison: dict[str, Any]) -> str:
    lines = [f"model={cfg.model} resolution={cfg.resolution} batch={cfg.batch_size} rank={cfg.rank} "
             f"dtype={cfg.dtype} device={cfg.device} gradient_checkpointing={cfg.gradient_checkpointing} "
             f"steps={cfg.steps} (+{cfg.warmup} warmup) ours_targets={cfg.ours_targets}",
             f"{'variant':<8} {'modules':>8} {'trainable':>12} {'median step s':>14} {'peak MiB':>10} "
             f"{'first loss':>11}"]
    for name in VARIANTS:
        r = results.get(name, {})
        if not r.get("ran"):
            lines.append(f"{name:<8} not run: {r.get('reason', 'skipped')}")
            continue
        first = f"{r['losses'][0]:.6f}" if r["losses"] else "-"
        median = f"{r['median_step_s']:.4f}" if r["median_step_s"] is not None else "-"
        lines.append(f"{name:<8} {r['lora_modules']:>8} {r['trainable_params']:>12,} {median:>14} "
                     f"{r['peak_memory_mib']:>10.0f} {first:>11}")
    if comparison:
        def fmt(v: float | None) -> str:
            return f"{v:.3f}" if v is not None else "-"
        lines.append(f"ours/peft: step time {fmt(comparison['step_time_ours_over_peft'])} (fastest steps "
                     f"{fmt(comparison.get('min_step_time_ours_over_peft'))}), peak memory "
                     f"{fmt(comparison['peak_memory_ours_over_peft'])}, trainable params "
                     f"{fmt(comparison['trainable_params_ours_over_peft'])}; same base weights: "
                     f"{comparison['same_base_weights']}, same module count: {comparison['same_target_modules']}")
    ours = results.get("ours", {})
    if ours.get("ran"):
        lines.append(f"(networks.lora's default U-Net target set at this rank: {ours['default_target_modules_ours']} "
                     f"modules, {ours['default_target_params_ours']:,} params -- attention + ff + proj_in/out)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "sdxl-arch"), default="tiny")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours_targets", choices=("attn", "all"), default="attn",
                   help="attn: only to_q/to_k/to_v/to_out.0, like the PEFT reference (default); all: "
                        "networks.lora's default set (every Linear in the transformer blocks)")
    p.add_argument("--variants", default="ours,peft", help="comma-separated subset of ours,peft")
    p.add_argument("--variant_timeout", type=float, default=None, help="seconds per variant subprocess")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # internal: one variant
    args = p.parse_args(argv)
    cfg = BenchConfig(args.model, args.resolution, args.batch_size, args.rank, args.steps, args.warmup,
                      args.gradient_checkpointing, args.dtype, args.device, args.seed, args.ours_targets)
    return cfg, args


def validate(cfg: BenchConfig, args: argparse.Namespace) -> list[str]:
    from library.errors import UserError

    if cfg.resolution <= 0 or cfg.resolution % 64:
        raise UserError(f"--resolution: expected a positive multiple of 64 (the U-Net downsamples latents 4x), "
                        f"got {cfg.resolution}")
    for flag, value, low in (("--batch_size", cfg.batch_size, 1), ("--rank", cfg.rank, 1),
                             ("--steps", cfg.steps, 1), ("--warmup", cfg.warmup, 0)):
        if value < low:
            raise UserError(f"{flag}: expected an integer >= {low}, got {value}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise UserError(f"--variants: expected a comma-separated subset of {','.join(VARIANTS)}, got {args.variants!r}")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available to this torch build")
    return variants


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    variants = validate(cfg, args)
    if args.variant:  # child: one variant, JSON only
        result = run_variant(cfg, args.variant)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0

    results = {}
    for variant in VARIANTS:
        if variant in variants:
            print(f"running {variant} ...", file=sys.stderr, flush=True)
            results[variant] = spawn_variant(cfg, variant, args.variant_timeout)
        else:
            results[variant] = {"variant": variant, "ran": False, "reason": "not requested (--variants)"}
    comparison = compare(results)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "config": asdict(cfg),
              "machine": machine_info(cfg.device), "results": results, "comparison": comparison}
    print(format_table(cfg, results, comparison))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if all(results[v].get("ran") for v in variants) else 1


if __name__ == "__main__":
    from library.cli import run_main

    sys.exit(run_main(main))
