"""Merge one or more LoRA files into an SDXL checkpoint and save it as one .safetensors (official SGM layout).

    python tools/merge_lora.py --sd_model base.safetensors --models a.safetensors b.safetensors --ratios 1 0.5 \
        --save_to merged.safetensors [--save_precision fp16]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd_model", required=True, help="SDXL single file or diffusers folder")
    p.add_argument("--models", nargs="+", required=True, help="kohya LoRA files")
    p.add_argument("--ratios", nargs="*", type=float, default=[], help="one multiplier per LoRA (default 1)")
    p.add_argument("--save_to", required=True)
    p.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None)
    p.add_argument("--allow_pickle", action="store_true")
    args = p.parse_args(argv)
    from library.models.merge import merge_loras_into_sdxl

    n = merge_loras_into_sdxl(args.sd_model, args.models, args.ratios, args.save_to, args.save_precision,
                              args.allow_pickle)
    print(f"merged {n} modules; wrote {args.save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
