"""Diagnose FLUX --fp8_base / --blocks_to_swap training on a GPU: the same tiny transformer and LoRA (seeded the
same way in every variant) trained a few AdamW steps with and without each flag.

Per variant it prints the losses, the gradient norm and the LoRA parameters whose gradient is not finite, and
whether step 1's gradients equal those of the variant that differs only by swapping (swapping must be exact).
A variant with a non-finite gradient is rerun under autograd anomaly detection, which names the backward op.

    python bench/flux_lowvram_diag.py [--device cuda] [--steps 3] [--variants plain,gc,fp8,...]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback

import torch

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {  # name: (gradient checkpointing, fp8, blocks to swap)
    "plain": (False, False, 0), "gc": (True, False, 0), "fp8": (False, True, 0), "fp8gc": (True, True, 0),
    "swapgc": (True, False, 2), "fp8swapgc": (True, True, 2),
}
SAME_AS = {"swapgc": "gc", "fp8swapgc": "fp8gc"}  # swapping must not change a single bit


def inputs(config, step: int, device: str) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n_img, n_txt = 16, 8
    x = dict(hidden_states=torch.randn(2, n_img, config.in_channels, generator=g),
             encoder_hidden_states=torch.randn(2, n_txt, config.joint_attention_dim, generator=g),
             pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
             timestep=torch.rand(2, generator=g), img_ids=torch.randn(n_img, 3, generator=g) * 4,
             txt_ids=torch.zeros(n_txt, 3), guidance=torch.full((2,), 3.5))
    target = torch.randn(2, n_img, config.in_channels, generator=g)
    return {k: v.to(device) for k, v in x.items()}, target.to(device)


def run_variant(base, name: str, device: str, steps: int, anomaly: bool = False) -> dict:
    from library.models.lowvram import BlockSwapper, apply_fp8_linear
    from library.train.loop_math import nonfinite_grads
    from networks.lora_flux import create_network

    gc, fp8, swap = VARIANTS[name]
    tr = copy.deepcopy(base).requires_grad_(False).to(device, torch.bfloat16)
    if gc:
        tr.enable_gradient_checkpointing()
        tr.train()
    else:
        tr.eval()
    if fp8:
        apply_fp8_linear(tr, torch.bfloat16)
    torch.manual_seed(0)
    net = create_network(1.0, 4, 4.0, None, [], tr)
    net.apply_to([], tr, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():  # a non-zero up projection so every LoRA weight gets a gradient at step 1
        for p in net.parameters():
            if p.ndim == 2 and not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    net.to(device)
    swapper = BlockSwapper.attach(tr, swap, device) if swap else None
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    out = {"losses": [], "grad_norms": [], "bad_grads": [], "step1_grads": None, "error": None}
    try:
        for step in range(1, steps + 1):
            x, target = inputs(tr.config, step, device)
            with torch.autograd.set_detect_anomaly(anomaly):
                with torch.autocast(device, torch.bfloat16):
                    pred = tr(**x).sample
                loss = F.mse_loss(pred.float(), target)
                loss.backward()
            bad = nonfinite_grads(list(net.named_parameters()), limit=5)
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            out["losses"].append(loss.item())
            out["grad_norms"].append(norm.item())
            out["bad_grads"].append(bad)
            if step == 1:
                out["step1_grads"] = [p.grad.detach().float().cpu().clone() for p in params]
            opt.step()
            opt.zero_grad(set_to_none=True)
    except Exception as e:  # anomaly mode raises at the op that produced the NaN
        out["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()[-1500:]
    if swapper is not None:
        swapper.detach()
    return out


def main() -> None:
    from library.models.tiny_flux import build_tiny_flux

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sdpa", choices=["training", "all", "math"], default="training",
                    help="training: the kernels training allows (no cuDNN, library/train/attention.py); all: "
                         "PyTorch's default choice; math: the reference kernel only")
    args = ap.parse_args()
    if args.sdpa == "training":
        from library.train.attention import configure_training_attention

        configure_training_attention(allow_cudnn=False)
    elif args.sdpa == "math" and args.device == "cuda":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    base = build_tiny_flux(0).transformer
    results = {}
    for name in args.variants.split(","):
        r = run_variant(base, name, args.device, args.steps)
        results[name] = r
        line = {"variant": name, "losses": [round(v, 6) for v in r["losses"]],
                "grad_norms": [round(v, 4) for v in r["grad_norms"]], "bad_grads": r["bad_grads"]}
        ref = results.get(SAME_AS.get(name, ""))
        if ref is not None and ref["step1_grads"] is not None and r["step1_grads"] is not None:
            line["step1_grads_equal_to_" + SAME_AS[name]] = all(
                torch.equal(a, b) for a, b in zip(r["step1_grads"], ref["step1_grads"]))
        if r["error"]:
            line["error"] = r["error"]
        print(json.dumps(line), flush=True)
        if any(r["bad_grads"]):
            a = run_variant(base, name, args.device, 1, anomaly=True)
            print(json.dumps({"variant": name, "anomaly": a["error"]}), flush=True)


if __name__ == "__main__":
    main()
