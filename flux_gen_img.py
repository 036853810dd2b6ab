"""Generate images with FLUX.1 from the prompt language (wildcards, variants, per-prompt options), with the
conventions of sdxl_gen_img.py: LoRA networks, Kontext edits, ControlNets, PNG metadata (docs/controlnets.md).

    python flux_gen_img.py --pretrained_model_name_or_path flux1-dev.safetensors --ae ae.safetensors \
        --clip_l clip_l.safetensors --t5xxl t5xxl.safetensors --outdir out --from_file prompts.txt \
        --images_per_prompt 4 --W 1024 --H 1024 --steps 28 --guidance_scale 3.5 --seed 1
    # Kontext: edit every image of a folder with one prompt, outputs at each image's size
    python flux_gen_img.py --pretrained_model_name_or_path kontext.safetensors ... --control_image inputs/ \
        --prompt "make it a watercolor"
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runnable from any folder

from library.cli import run_main  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    from library.sample.flux_generate import build_flux_parser, flux_config_from_args, run_flux_generation

    args = build_flux_parser(__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    paths = run_flux_generation(flux_config_from_args(args))
    print(f"{len(paths)} image(s) written to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
