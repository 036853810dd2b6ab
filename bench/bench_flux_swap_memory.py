"""GPU memory and step time of FLUX LoRA training with --blocks_to_swap / --fp8_base at the real block width.

A FLUX-shaped transformer with full-size blocks (hidden 3072, 24 heads of 128) but fewer of them (default 2 double +
4 single, about 1.2B parameters), randomly initialised; the trainer's own placement (`prepare_base_models`), low-VRAM
hook and LoRA. Per variant: GPU memory once the models are placed, the peak over a training step with gradient
checkpointing, and the mean step time over the last steps. Run on a GPU:

    python bench/bench_flux_swap_memory.py [--double 4 --single 8 --tokens 1024 --steps 4]

bench/bench_flux_swap_speed.py reuses `run` with the issue #18 settings (1024 px, half the blocks swapped) and prints
the step-time ratios.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(variant: str, args, base) -> dict:
    from library.config.flux_config import FluxConfig, FluxModelConfig
    from library.train.attention import configure_training_attention
    from library.families.flux import FluxFamily, FluxFamilyModels
    from library.train.loop import prepare_base_models
    from networks.lora_flux import create_network

    configure_training_attention(False)
    swap = args.swap if "swap" in variant else 0
    fcfg = FluxConfig(fp8_base="fp8" in variant, blocks_to_swap=swap or None)
    tr = copy.deepcopy(base)  # the same CPU weights for every variant
    models = FluxFamilyModels(denoiser=tr, vae=torch.nn.Linear(1, 1))
    cfg = SimpleNamespace(model=SimpleNamespace(no_half_vae=False),
                          training=SimpleNamespace(xformers=False, gradient_checkpointing=True),
                          environment=SimpleNamespace(cpu_offload_checkpointing=False))
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    if before > 2**20:
        print(f"warning: {before / 2**20:.0f} MiB still allocated before {variant}", file=sys.stderr)
    torch.cuda.reset_peak_memory_stats()
    prepare_base_models(cfg, FluxFamily(FluxModelConfig(flux=fcfg)), models, torch.device("cuda"), torch.bfloat16)
    loaded = torch.cuda.max_memory_allocated()
    torch.manual_seed(0)
    net = create_network(1.0, 16, 16.0, None, [], tr)
    net.apply_to([], tr, apply_text_encoder=False, apply_unet=True)
    net.to("cuda")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, args.tokens, 64, generator=g),
             encoder_hidden_states=torch.randn(1, 512, 4096, generator=g),
             pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.full((1,), 0.5),
             img_ids=torch.zeros(args.tokens, 3), txt_ids=torch.zeros(512, 3), guidance=torch.full((1,), 1.0))
    x = {k: v.cuda() for k, v in x.items()}
    target = torch.randn(1, args.tokens, 64, generator=g).cuda()
    times, losses = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            pred = tr(**x).sample
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 6))
    out = {"variant": variant, "loaded_MiB": round(loaded / 2**20), "train_peak_MiB":
           round(torch.cuda.max_memory_allocated() / 2**20), "step_s": round(sum(times[1:]) / max(len(times) - 1, 1), 3),
           "losses": losses}
    swapper = models.block_swapper
    if swapper is not None:
        swapper.detach()
    # the LoRA and the model reference each other (wrapped forwards): collect the cycle, or the next variant's
    # memory figures include this one's leftovers
    del tr, net, opt, models, swapper, pred, loss, x, target
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    from diffusers import FluxTransformer2DModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--swap", type=int, default=4, help="blocks to swap in the swap variants")
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (1024 = 512x512 px)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--variants", default="plain,swap,fp8,fp8swap")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, guidance_embeds=True)
    base.requires_grad_(False).to(torch.bfloat16)
    params = sum(p.numel() for p in base.parameters())
    print(json.dumps({"params_B": round(params / 1e9, 2), "double": args.double, "single": args.single,
                      "swap": args.swap, "tokens": args.tokens, "gpu": torch.cuda.get_device_name()}), flush=True)
    for v in args.variants.split(","):
        print(json.dumps(run(v, args, base)), flush=True)


if __name__ == "__main__":
    main()
