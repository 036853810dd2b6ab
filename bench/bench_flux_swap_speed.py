"""What --blocks_to_swap costs in step time, and what it saves in GPU memory, at FLUX's real block width (issue #18).

Same setup as bench/bench_flux_swap_memory.py (whose `run` does each training variant: the trainer's own placement
and low-VRAM hook, a LoRA of rank 16, gradient checkpointing, bf16 autocast), with defaults sized for the goal:
4 double + 8 single full-width blocks (hidden 3072), 4096 image tokens (1024 px) + 512 text tokens, and half the
blocks swapped. Per variant it prints one JSON line (GPU memory once placed, training peak, mean step time from the
second step on, losses), then the ratios: swap / plain and fp8+swap / fp8 step time (goal <= 1.3) beside the peak
memory each saves. `--inference` adds no-grad forward timings (what generation pays per denoising step).

    python bench/bench_flux_swap_speed.py [--double 4 --single 8 --tokens 4096 --swap 6 --prefetch 1 --steps 6]

`--prefetch 0,1,2` measures several prefetch depths (blocks copied ahead of the running one; 1 is the default in
library/models/lowvram.py). Needs a CUDA GPU; a CPU-only machine gets a one-line message.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _set_prefetch(prefetch: int) -> None:
    import library.families.flux_placement as placement

    placement.DEFAULT_SWAP_PREFETCH = prefetch  # apply_low_vram's default (a --swap_prefetch flag would set it)


def inference(variant: str, args, base, prefetch: int) -> dict:
    """No-grad forwards of the whole transformer, as each denoising step of generation does."""
    from library.config.flux_config import FluxConfig
    from library.families.flux_placement import apply_low_vram, place_transformer

    swap = args.swap if "swap" in variant else 0
    tr = copy.deepcopy(base)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    device = torch.device("cuda")
    place_transformer(tr, device, torch.bfloat16, swap or None)
    _set_prefetch(prefetch)
    swapper = apply_low_vram(tr, FluxConfig(fp8_base="fp8" in variant, blocks_to_swap=swap or None), device)
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, args.tokens, 64, generator=g),
             encoder_hidden_states=torch.randn(1, 512, 4096, generator=g),
             pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.full((1,), 0.5),
             img_ids=torch.zeros(args.tokens, 3), txt_ids=torch.zeros(512, 3), guidance=torch.full((1,), 1.0))
    x = {k: v.to(device, torch.bfloat16) for k, v in x.items()}
    times = []
    with torch.no_grad():
        for _ in range(args.steps):
            torch.cuda.synchronize()  # the benchmark's clock only; the swapper itself never synchronises
            t0 = time.perf_counter()
            tr(**x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out = {"variant": f"infer_{variant}", "prefetch": prefetch if swap else None,
           "peak_MiB": round(torch.cuda.max_memory_allocated() / 2**20),
           "forward_s": round(sum(times[1:]) / max(len(times) - 1, 1), 4)}
    if swapper is not None:
        swapper.detach()
    del tr, swapper, x
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _ratios(rows: list[dict], time_key: str, peak_key: str) -> list[dict]:
    by_name = {r["variant"]: r for r in rows}
    out = []
    for r in rows:
        name = r["variant"]
        if "swap" not in name:
            continue
        prefix = name.split("swap")[0]  # "", "fp8", "infer_", "infer_fp8"
        ref_name = prefix + "plain" if prefix in ("", "infer_") else prefix
        ref = by_name.get(ref_name)
        if ref is None:
            continue
        out.append({"variant": name, "vs": ref_name, "time_ratio": round(r[time_key] / ref[time_key], 3),
                    "goal": "<= 1.3", "peak_saved_MiB": ref[peak_key] - r[peak_key],
                    "peak_ratio": round(r[peak_key] / ref[peak_key], 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--double", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--swap", type=int, default=None, help="blocks to swap (default: half of all blocks)")
    ap.add_argument("--prefetch", default="1", help="comma-separated prefetch depths for the swap variants")
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens (4096 = 1024x1024 px)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--inference", action="store_true", help="also time no-grad forwards (generation)")
    ap.add_argument("--json", default=None, help="also write every line to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_flux_swap_speed.py needs a CUDA GPU (it measures host-to-GPU copies)", file=sys.stderr)
        raise SystemExit(2)
    from bench_flux_swap_memory import run
    from diffusers import FluxTransformer2DModel

    if args.swap is None:
        args.swap = (args.double + args.single) // 2
    torch.manual_seed(0)
    base = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, guidance_embeds=True)
    base.requires_grad_(False).to(torch.bfloat16)
    lines: list[dict] = [{"params_B": round(sum(p.numel() for p in base.parameters()) / 1e9, 2),
                          "double": args.double, "single": args.single, "swap": args.swap, "tokens": args.tokens,
                          "text_tokens": 512, "steps": args.steps, "gpu": torch.cuda.get_device_name(),
                          "torch": torch.__version__}]
    print(json.dumps(lines[0]), flush=True)
    prefetches = [int(p) for p in args.prefetch.split(",")]
    train_rows, infer_rows = [], []
    for fp8 in ("", "fp8"):
        row = run(fp8 or "plain", args, base)
        train_rows.append(row)
        print(json.dumps(row), flush=True)
        for p in prefetches:
            _set_prefetch(p)
            name = f"{fp8}swap" + (f"_p{p}" if len(prefetches) > 1 else "")
            row = dict(run(name, args, base), prefetch=p)
            train_rows.append(row)
            print(json.dumps(row), flush=True)
        if args.inference:
            for name, p in [(fp8 or "plain", 0)] + [(f"{fp8}swap" + (f"_p{p}" if len(prefetches) > 1 else ""), p)
                                                  for p in prefetches]:
                row = inference(name, args, base, p)
                infer_rows.append(row)
                print(json.dumps(row), flush=True)
    ratios = _ratios(train_rows, "step_s", "train_peak_MiB") + _ratios(infer_rows, "forward_s", "peak_MiB")
    for r in ratios:
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            for r in lines + train_rows + infer_rows + ratios:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
