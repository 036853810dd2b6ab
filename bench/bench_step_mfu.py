"""Step time, images/s, peak memory and MFU of one LoRA training step, SDXL and FLUX, ours against diffusers + PEFT.

    python bench/bench_step_mfu.py --device cuda [--families sdxl,flux] [--resolution 1024] [--batch_sizes 1,4,8] \
        [--gc off,on] [--dtype bf16] [--steps 6 --warmup 3] [--torch_compile] [--json out.json] [--profile DIR]
    python bench/bench_step_mfu.py --tiny --device cpu        # the tiny models: a smoke run of the whole script

Per configuration (family x batch size x gradient checkpointing) and variant, a subprocess builds the model (random
weights from a fixed seed: no download), attaches the LoRA and times `warmup + steps` training steps (forward, loss,
backward, gradient clipping, AdamW step, zero_grad; data and text encoding are cached by both trainers, so not timed):
- ours: our trainer's step, `compute_loss` through the family's `predict` (SDXL: `networks.lora` on the attention
  projections, as bench/bench_lora_step.py does; FLUX: `networks.lora_flux`'s default set);
- peft: the diffusers example's step, `add_adapter(LoraConfig(...))` on the attention projections and `F.mse_loss`.
  (FLUX: diffusers' train_dreambooth_lora_flux.py default targets; our default FLUX set is larger, the JSON has
  both parameter counts.)

MFU (model FLOPs utilisation) = FLOPs of one step / (median step time x the device's dense bf16 peak). The FLOPs are
counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of the same model
(with the LoRA) at the same resolution, on batch 1 (before the timed steps, with no optimizer step), times the batch
size (every layer here is per sample, so the FLOPs are linear in the batch). They are the model's FLOPs: counted
without gradient checkpointing, so a checkpointed step has the same FLOPs and a lower MFU (its recompute is overhead,
as in the PaLM paper's MFU). The frozen base weights get no weight gradients, so the backward is about one forward,
not two. The peak comes from `PEAK_BF16_TFLOPS` by device name (dense, no
sparsity); `--peak_tflops` overrides it; on a CPU there is no MFU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Callable, Sequence

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))  # the repository
sys.path.insert(0, BENCH)  # bench_lora_step

FAMILIES = ("sdxl", "flux")
VARIANTS = ("ours", "peft")
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
FLUX_PEFT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
T5_TOKENS = 512

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets. Matched by substring of
# torch.cuda.get_device_name(), first match wins (so "H100" after the more specific names).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A10G", 70.0),
    ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)


@dataclass(frozen=True)
class StepConfig:
    family: str
    tiny: bool
    resolution: int
    batch_size: int
    gradient_checkpointing: bool
    dtype: str
    device: str
    rank: int
    steps: int
    warmup: int
    seed: int
    torch_compile: bool
    flux_double: int | None
    flux_single: int | None
    profile_dir: str | None = None  # --profile: one more step under torch.profiler, its trace written there


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name), None)


def mfu(flops: float | None, step_s: float | None, peak: float | None) -> float | None:
    if not flops or not step_s or not peak:
        return None
    return flops / (step_s * peak * 1e12)


# --------------------------------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------------------------------


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of `step()` (matrix products, convolutions, attention) as torch's FlopCounterMode counts them: the
    forward, and the backward when `step` calls it."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------------------------
# Models, adapters and the step (one variant, in its own process)
# --------------------------------------------------------------------------------------------------------------------


def _lora_bench_config(cfg: StepConfig, device: str):
    import bench_lora_step as bls

    return bls.BenchConfig("tiny" if cfg.tiny else "sdxl-arch", cfg.resolution, cfg.batch_size, cfg.rank, cfg.steps,
                           cfg.warmup, cfg.gradient_checkpointing, cfg.dtype, device, cfg.seed, "attn")


def flux_config(cfg: StepConfig) -> dict[str, Any]:
    """FLUX.1-dev's transformer (diffusers' defaults, with the guidance embedder), or the tests' tiny one."""
    from library.models.tiny_flux import TINY_FLUX_TRANSFORMER

    if cfg.tiny:
        out = dict(TINY_FLUX_TRANSFORMER)
    else:
        out = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
    if cfg.flux_double is not None:
        out["num_layers"] = cfg.flux_double
    if cfg.flux_single is not None:
        out["num_single_layers"] = cfg.flux_single
    return out


def build_model(cfg: StepConfig, device: str):
    import torch

    torch.manual_seed(cfg.seed)
    with torch.device(device):
        if cfg.family == "sdxl":
            import bench_lora_step as bls

            model = bls.build_unet(_lora_bench_config(cfg, device))
        else:
            from diffusers import FluxTransformer2DModel

            model = FluxTransformer2DModel(**flux_config(cfg))
    return model.requires_grad_(False)


def attach(model, cfg: StepConfig, variant: str, device: str) -> list[Any]:
    """The LoRA of `variant` on `model`; returns the trainable parameters."""
    import torch

    if cfg.family == "sdxl":
        import bench_lora_step as bls

        bc = _lora_bench_config(cfg, device)
        if variant == "ours":
            _, groups, _ = bls.setup_ours(model, bc)
            return [p for g in groups for p in g["params"]]
        params, _ = bls.setup_peft(model, bc)
        return params
    if variant == "ours":
        from networks.lora_flux import create_network

        net = create_network(1.0, cfg.rank, float(cfg.rank), None, [], model)
        net.apply_to([], model, apply_text_encoder=False, apply_unet=True)
        net.to(device, torch.float32)
        net.train()
        return [p for p in net.parameters() if p.requires_grad]
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                 target_modules=list(FLUX_PEFT_TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def make_inputs(cfg: StepConfig, model, device: str, dtype) -> dict[str, Any]:
    """Fixed random latents and text states (the cached inputs both trainers start from) and one noise draw."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed + 1)
    b, side = cfg.batch_size, cfg.resolution // 8
    if cfg.family == "sdxl":
        import bench_lora_step as bls

        data = bls.make_batch(_lora_bench_config(cfg, device), dict(model.config))
        return {"latents": data["latents"], "text": {"encoder_hidden_states": data["encoder_hidden_states"],
                                                     "pooled": data["pooled"]},
                "time_ids": data["time_ids"], "batch": data["size_batch"], "noise": data["noise"][0],
                "t": data["timesteps"][0]}
    c = model.config
    latents = torch.randn((b, 16, side, side), generator=g)
    return {"latents": latents,
            "text": {"t5": torch.randn((b, T5_TOKENS, c.joint_attention_dim), generator=g),
                     "pooled": torch.randn((b, c.pooled_projection_dim), generator=g)},
            "batch": SimpleNamespace(conditioning_images=None, alpha_masks=None, loss_weights=None, images=None),
            "noise": torch.randn(latents.shape, generator=g), "t": torch.rand((b,), generator=g)}


def step_function(cfg: StepConfig, variant: str, model, params: list[Any], device: str,
                  optimize: bool = True) -> tuple[Callable, Any]:
    """(one training step returning the loss, the optimizer); `optimize=False`: forward and backward only."""
    import torch
    import torch.nn.functional as F

    from library.config.training_flags import TrainingConfig
    from library.families import noise as noise_lib
    from library.families.interface import NoisyInput
    from library.train.loss_step import compute_loss

    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    dev = torch.device(device)
    data = make_inputs(cfg, model, device, dtype)
    def move(t):
        return t.to(dev, dtype)

    latents, noise, text = move(data["latents"]), move(data["noise"]), {k: move(v) for k, v in data["text"].items()}
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    training = TrainingConfig()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE) if optimize else None

    if cfg.family == "sdxl":
        from library.families.sdxl import SDXLFamily, SDXLFamilyModels

        family = SDXLFamily()
        models = SDXLFamilyModels(denoiser=model, vae=torch.nn.Identity())
        t = data["t"].to(dev)
        noisy = noise_lib.add_noise(latents, noise, t, family.alphas_cumprod.to(dev))
        time_ids = move(data["time_ids"])

        def peft_forward():
            return model(noisy, t, text["encoder_hidden_states"],
                         added_cond_kwargs={"text_embeds": text["pooled"], "time_ids": time_ids}).sample
        target = noise
    else:
        from library.config.flux_config import FluxConfig, FluxModelConfig
        from library.families.flux import FluxFamily, FluxFamilyModels
        from library.families.flux_latents import image_ids, pack_latents, unpack_latents

        # the raw flow-matching prediction and guidance 1, as the PEFT step below: the same problem on both sides
        family = FluxFamily(FluxModelConfig(flux=FluxConfig(model_prediction_type="raw", guidance_scale=1.0)))
        models = FluxFamilyModels(denoiser=model, vae=torch.nn.Identity())
        t = data["t"].to(dev, dtype)
        tb = t.view(-1, 1, 1, 1)
        noisy = (1 - tb) * latents + tb * noise
        h, w = latents.shape[-2:]

        def peft_forward():
            out = model(hidden_states=pack_latents(noisy), encoder_hidden_states=text["t5"],
                        pooled_projections=text["pooled"], timestep=t, img_ids=image_ids(h, w, dev, dtype),
                        txt_ids=torch.zeros(T5_TOKENS, 3, device=dev, dtype=dtype),
                        guidance=torch.full((latents.shape[0],), 1.0, device=dev, dtype=dtype)).sample
            return unpack_latents(out, h, w)
        target = noise - latents

    inp = NoisyInput(noisy=noisy, noise=noise, timesteps=t)

    def loss_fn():
        if variant == "ours":
            return compute_loss(family, models, training, data["batch"], latents, text, inp=inp,
                                autocast=lambda: autocast)
        with autocast:
            pred = peft_forward()
        return F.mse_loss(pred.float(), target.float())

    def step():
        loss = loss_fn()
        loss.backward()
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
        for p in params:
            p.grad = None
        return loss

    return step, optimizer


def prepare(cfg: StepConfig, variant: str, device: str) -> tuple[Any, list[Any], Callable, int]:
    """The model with its LoRA, the step, and the model FLOPs of one step (counted before any compile)."""
    import dataclasses

    import torch

    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    model = build_model(cfg, device)
    model.to(dtype=dtype)
    model.train() if cfg.gradient_checkpointing else model.eval()
    params = attach(model, cfg, variant, device)
    count_step, _ = step_function(dataclasses.replace(cfg, batch_size=1), variant, model, params, device,
                                  optimize=False)
    flops = count_flops(count_step) * cfg.batch_size  # no checkpointing yet: the model's FLOPs
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.torch_compile:
        from library.train.compile import compile_denoiser_blocks

        compile_denoiser_blocks(model, "inductor")
    step, _ = step_function(cfg, variant, model, params, device)
    return model, params, step, flops


def run_variant(cfg: StepConfig, variant: str) -> dict[str, Any]:
    import torch

    from library.train.attention import configure_training_attention

    configure_training_attention(False)
    t0 = time.perf_counter()
    model, params, step, flops = prepare(cfg, variant, cfg.device)
    setup_s = time.perf_counter() - t0
    cuda = cfg.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(cfg.warmup + cfg.steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    timed = times[cfg.warmup:]
    median = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    profile = profile_step(cfg, variant, step, sync) if cfg.profile_dir else None
    return {"profile": profile, "variant": variant, "ran": True, "trainable_params": sum(p.numel() for p in params),
            "base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad), "setup_s": setup_s,
            "flops_per_step": flops, "step_times_s": times, "median_step_s": median, "min_step_s": min(timed),
            "images_per_s": cfg.batch_size / median, "peak_memory_mib": peak, "losses": losses}


def profile_step(cfg: StepConfig, variant: str, step: Callable[[], Any], sync: Callable[[], None]) -> dict[str, Any]:
    """One more step under torch.profiler (after the timed ones, so that the timings carry no profiler overhead):
    its Chrome trace (open in Perfetto or chrome://tracing) goes to `cfg.profile_dir`, gzipped, and the ops that
    took the most time on the device (the host on a CPU run) come back in the JSON, to say where the step goes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = cfg.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities, record_shapes=False) as prof:
        step()
        sync()
    os.makedirs(cfg.profile_dir, exist_ok=True)
    name = f"{cfg.family}_{cfg.resolution}px_b{cfg.batch_size}_gc{'on' if cfg.gradient_checkpointing else 'off'}"
    trace = os.path.join(cfg.profile_dir, f"{name}_{variant}.trace.json.gz")
    prof.export_chrome_trace(trace)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in events) or 1.0
    top = [{"op": e.key, "self_ms": getattr(e, key, 0.0) / 1e3, "share": getattr(e, key, 0.0) / total,
            "calls": e.count} for e in events[:15]]
    return {"trace": trace, "time_source": "device" if cuda else "host", "top": top}


# --------------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per configuration and variant
# --------------------------------------------------------------------------------------------------------------------


def child_command(cfg: StepConfig, variant: str, path: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", json.dumps(asdict(cfg)), "--variant", variant,
            "--json", path]


def spawn(cfg: StepConfig, variant: str, timeout: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        try:
            proc = subprocess.run(child_command(cfg, variant, path), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "ran": False, "reason": f"timed out after {timeout} s"}
        if proc.returncode == 0 and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        reason = f"exit code {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode in (-9, 137) else "")
        return {"variant": variant, "ran": False, "reason": reason,
                "stderr_tail": (proc.stderr or proc.stdout or "").strip().splitlines()[-8:]}


def device_name(device: str) -> str | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(0)


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (f"{'family':6} {'batch':>5} {'gc':>3} {'variant':7} {'step s':>8} {'img/s':>7} {'peak MiB':>9} "
            f"{'GFLOP/step':>11} {'MFU':>6} {'vs peft':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r.get("ran"):
            lines.append(f"{r['family']:6} {r['batch_size']:>5} {'on' if r['gc'] else 'off':>3} {r['variant']:7} "
                         f"not run: {r.get('reason')}")
            continue
        peak = f"{r['peak_memory_mib']:.0f}" if r.get("peak_memory_mib") is not None else "-"
        m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        vs = f"{r['time_vs_peft']:.2f}" if r.get("time_vs_peft") is not None else "-"
        lines.append(f"{r['family']:6} {r['batch_size']:>5} {'on' if r['gc'] else 'off':>3} {r['variant']:7} "
                     f"{r['median_step_s']:8.3f} {r['images_per_s']:7.2f} {peak:>9} "
                     f"{r['flops_per_step'] / 1e9:11.1f} {m:>6} {vs:>7}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="sdxl,flux")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny models (smoke run)")
    p.add_argument("--resolution", type=int, default=None, help="default: 1024 (64 with --tiny)")
    p.add_argument("--batch_sizes", default=None, help="default: 1,4,8 (1,2 with --tiny)")
    p.add_argument("--gc", default="off,on", help="gradient checkpointing: off, on or off,on")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6; 1 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --tiny)")
    p.add_argument("--variants", default="ours,peft")
    p.add_argument("--torch_compile", action="store_true", help="compile the blocks (inductor) in both variants")
    p.add_argument("--flux_double", type=int, default=None, help="FLUX double blocks (default: FLUX.1's 19)")
    p.add_argument("--flux_single", type=int, default=None, help="FLUX single blocks (default: FLUX.1's 38)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    p.add_argument("--variant_timeout", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timed steps, profile one more step per variant; Chrome traces go to DIR")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def configs(args: argparse.Namespace) -> list[StepConfig]:
    from library.errors import UserError

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not families or any(f not in FAMILIES for f in families):
        raise UserError(f"--families: expected a comma-separated subset of {','.join(FAMILIES)}, got {args.families!r}")
    resolution = args.resolution or (64 if args.tiny else 1024)
    if resolution <= 0 or resolution % 64:
        raise UserError(f"--resolution: expected a positive multiple of 64, got {resolution}")
    try:
        batches = [int(b) for b in (args.batch_sizes or ("1,2" if args.tiny else "1,4,8")).split(",")]
    except ValueError:
        raise UserError(f"--batch_sizes: expected comma-separated integers, got {args.batch_sizes!r}") from None
    gcs = {"off": False, "on": True}
    gc_values = [g.strip() for g in args.gc.split(",") if g.strip()]
    if not gc_values or any(g not in gcs for g in gc_values) or any(b < 1 for b in batches):
        raise UserError(f"--gc: expected off, on or off,on (got {args.gc!r}); --batch_sizes: integers >= 1")
    steps = args.steps if args.steps is not None else (1 if args.tiny else 6)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (use --device cpu, e.g. with --tiny)")
    return [StepConfig(f, args.tiny, resolution, b, gcs[g], args.dtype, args.device, args.rank, steps, warmup,
                       args.seed, args.torch_compile, args.flux_double, args.flux_single,
                       os.path.abspath(args.profile) if args.profile else None)
            for f, b, g in itertools.product(families, batches, gc_values)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:  # one configuration and variant, JSON only
        cfg = StepConfig(**json.loads(args.child))
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(run_variant(cfg, args.variant), f)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        from library.errors import UserError

        raise UserError(f"--variants: expected a comma-separated subset of {','.join(VARIANTS)}, got {args.variants!r}")
    cfgs = configs(args)
    name = device_name(args.device)
    peak = args.peak_tflops or peak_tflops(name)
    rows: list[dict[str, Any]] = []
    for cfg in cfgs:
        by_variant = {}
        for variant in variants:
            print(f"running {cfg.family} batch {cfg.batch_size} gc {'on' if cfg.gradient_checkpointing else 'off'} "
                  f"{variant} ...", file=sys.stderr, flush=True)
            r = spawn(cfg, variant, args.variant_timeout)
            r.update(family=cfg.family, batch_size=cfg.batch_size, gc=cfg.gradient_checkpointing, variant=variant)
            if r.get("ran"):
                r["mfu"] = mfu(r["flops_per_step"], r["median_step_s"], peak)
            by_variant[variant] = r
            rows.append(r)
        ours, ref = by_variant.get("ours", {}), by_variant.get("peft", {})
        if ours.get("ran") and ref.get("ran"):
            ours["time_vs_peft"] = ours["median_step_s"] / ref["median_step_s"]
            ours["first_loss_abs_diff"] = abs(ours["losses"][0] - ref["losses"][0])
    print(f"device: {name or args.device}; dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'unknown (no MFU)'}")
    print(format_rows(rows))
    if args.json:
        report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "device": name or args.device, "peak_tflops": peak,
                  "machine": {"platform": platform.platform(), "python": platform.python_version()},
                  "args": vars(args), "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if all(r.get("ran") for r in rows) else 1


if __name__ == "__main__":
    from library.cli import run_main

    sys.exit(run_main(main))
