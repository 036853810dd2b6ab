"""Cost of guidance per generated image on the tiny SDXL: plain generation, + ControlNet-LLLite, + a ControlNet
(diffusers ControlNetModel.from_unet of the same U-Net), with the same prompts, seeds, steps and size.

    python bench/bench_generation_cost.py [--resolution 128] [--steps 8] [--images 4] [--warmup 1] \
        [--device cpu|cuda] [--json out.json]

All three variants run in this one process on one loaded model (SDXLGenerator, as sdxl_gen_img.py and
tools/synthesize.py use it), one after the other, each after its own warm-up images; the time is wall-clock per
image including VAE decoding and PNG writing. Ratios are against plain generation. The tiny model's absolute times
say little about a real SDXL; the ratios say how much the guidance networks add relative to the U-Net.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from any folder

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

VARIANTS = ("plain", "lllite", "controlnet")


def _guide(folder: Path, size: int) -> str:
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = (((xx // 8) + (yy // 8)) % 2 * 255).astype(np.uint8)
    path = folder / "guide.png"
    Image.fromarray(np.stack([stripes] * 3, -1)).save(path)
    return str(path)


def _build_guidance(folder: Path) -> tuple[str, str]:
    """(LLLite file, ControlNet folder) for the tiny U-Net, built from fixed seeds."""
    from diffusers import ControlNetModel

    from library.models.tiny import build_tiny_sdxl
    from networks.control_net_lllite import create_network

    unet = build_tiny_sdxl(0).unet
    torch.manual_seed(0)
    lllite = create_network(unet, cond_emb_dim=8, network_dim=8)
    lllite_path = folder / "lllite.safetensors"
    lllite.save_weights(str(lllite_path))
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    cn.save_pretrained(folder / "controlnet")
    return str(lllite_path), str(folder / "controlnet")


def run(resolution: int, steps: int, images: int, warmup: int, device: str) -> dict[str, Any]:
    from library.models.sdxl_loader import load_sdxl
    from library.models.tiny import save_tiny_sdxl
    from library.sample.controlnets import ControlNetSpec
    from library.sample.generation import GenerationConfig, ImageRequest, LLLiteSpec, derive_seed, resolve_device
    from library.sample.sdxl_generate import SDXLGenerator

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = str(root / "tiny_sdxl.safetensors")
        save_tiny_sdxl(model, "single_file", seed=0)
        lllite, controlnet = _build_guidance(root)
        guide = _guide(root, resolution)
        dev = resolve_device(device)
        results: dict[str, Any] = {}
        for variant in VARIANTS:
            outdir = root / "images" / variant
            outdir.mkdir(parents=True)
            config = GenerationConfig(
                model=model, outdir=str(outdir), prompts=[], width=resolution, height=resolution, steps=steps,
                scale=7.5, seed=0, sampler="euler_a", device=device,
                lllite=[LLLiteSpec(lllite)] if variant == "lllite" else [],
                controlnets=[ControlNetSpec(controlnet, (guide,))] if variant == "controlnet" else [])
            generator = SDXLGenerator(load_sdxl(model, torch.float32, None, False), config, dev)

            def request(k: int) -> ImageRequest:
                return ImageRequest(index=k, prompt=f"a photo with {k + 1} dogs", negative_prompt=None,
                                    seed=derive_seed(0, k), width=resolution, height=resolution, steps=steps,
                                    scale=7.5, original_size=(resolution, resolution),
                                    control_image=guide if variant == "lllite" else None,
                                    controlnet_images=((guide,),) if variant == "controlnet" else None)

            for k in range(warmup):
                generator.generate([request(images + k)])
            times = []
            for k in range(images):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                generator.generate([request(k)])
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            results[variant] = {"seconds_per_image": sum(times) / len(times), "times": times}
    plain = results["plain"]["seconds_per_image"]
    for variant in VARIANTS:
        results[variant]["ratio_to_plain"] = results[variant]["seconds_per_image"] / plain
    return {"model": "tiny-sdxl", "resolution": resolution, "steps": steps, "images": images, "warmup": warmup,
            "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d"), "variants": results}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128, help="image side in pixels (multiple of 32)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--images", type=int, default=4, help="timed images per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed images per variant first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.resolution % 32 or args.images < 1 or args.steps < 1:
        p.error("--resolution must be a multiple of 32; --images and --steps at least 1")
    report = run(args.resolution, args.steps, args.images, args.warmup, args.device)
    for variant, r in report["variants"].items():
        print(f"{variant:>10}: {r['seconds_per_image'] * 1000:8.1f} ms/image  x{r['ratio_to_plain']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
