"""Write a tiny model with the real block layout and key names, for tests, demos, benchmarks and bug reports.

    python tools/make_tiny_model.py --family sdxl --output tiny_sdxl.safetensors [--format single_file] [--seed 0]
    python tools/make_tiny_model.py --family sdxl --output tiny_sdxl_folder --format diffusers
    python tools/make_tiny_model.py --family flux --output tiny_flux [--format single_file|diffusers]

A FLUX single_file output is a folder: flux.safetensors (BFL keys), ae.safetensors, clip_l.safetensors,
t5xxl.safetensors and the tokenizer/ (CLIP) and tokenizer_2/ (T5) folders.

The same seed gives the same weights in both formats. Families are registered in `FAMILIES`: a family is a
function (output, format, seed) -> written path.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
from typing import Callable  # noqa: E402

from library.errors import UserError  # noqa: E402

FORMATS = ("single_file", "diffusers")
Writer = Callable[[str, str, int], str]


def _write_sdxl(output: str, fmt: str, seed: int) -> str:
    from library.models.tiny import save_tiny_sdxl

    return save_tiny_sdxl(output, fmt, seed)  # type: ignore[arg-type]


def _write_flux(output: str, fmt: str, seed: int) -> str:
    from library.models.tiny_flux import save_tiny_flux

    return save_tiny_flux(output, fmt, seed)  # type: ignore[arg-type]


FAMILIES: dict[str, Writer] = {"sdxl": _write_sdxl, "flux": _write_flux}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write a tiny model in a real checkpoint format.")
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES), help="model family")
    parser.add_argument("--output", required=True, help="output file (single_file) or folder (diffusers)")
    parser.add_argument("--format", default="single_file", choices=FORMATS, help="checkpoint layout")
    parser.add_argument("--seed", type=int, default=0, help="weights depend only on the seed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = FAMILIES[args.family](args.output, args.format, args.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote tiny {args.family} model ({args.format}, seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
