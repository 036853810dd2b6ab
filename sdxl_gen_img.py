"""Generate images with SDXL from the prompt language (wildcards, variants, per-prompt options), e.g. to synthesise
a training set; every PNG carries its prompt, seed and settings (see docs/synthesis_recipe.md).

    python sdxl_gen_img.py --ckpt model.safetensors --outdir out --from_file prompts.txt --wildcards wc \
        --images_per_prompt 4 --W 1024 --H 1024 --steps 30 --sampler euler_a --seed 1 --batch_size 4
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runnable from any folder

from library.cli import run_main  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    from library.sample.gen_args import build_parser, config_from_args, setup_gen_logging, warn_environment_flags
    from library.sample.sdxl_generate import run_generation

    args = build_parser(__doc__).parse_args(argv)
    setup_gen_logging(args)
    warn_environment_flags(args)
    paths = run_generation(config_from_args(args))
    print(f"{len(paths)} image(s) written to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
