"""Write a caption file next to each generated PNG from the prompt stored in its metadata.

Generated (synthetic) images carry their prompt in a ``prompt`` text chunk (sd-scripts) or in A1111's
``parameters``; training on them needs the same text as ``<stem><caption_extension>`` files.

    python tools/captions_from_png.py --image_dir D [--caption_extension .txt] [--overwrite] [--strict]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

from library.errors import UserError  # noqa: E402
from library.fileio import write_text_atomic  # noqa: E402
from library.prompts.png_metadata import read_png_info  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write caption files from the prompts stored in PNG metadata.")
    parser.add_argument("--image_dir", required=True, help="folder with the PNG images")
    parser.add_argument("--caption_extension", default=".txt", help="caption file extension (default: .txt)")
    parser.add_argument("--overwrite", action="store_true", help="replace caption files that already exist")
    parser.add_argument("--recursive", action="store_true", help="also look in subfolders")
    parser.add_argument("--strict", action="store_true", help="exit non-zero when some images hold no prompt")
    return parser


def _write_text_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def find_pngs(image_dir: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in image_dir.glob(pattern) if p.is_file() and p.suffix.lower() == ".png")


def write_captions(
    image_dir: Path, extension: str, overwrite: bool, recursive: bool = False
) -> tuple[int, list[Path], list[Path]]:
    """Write the captions; return (written count, images skipped because a caption exists, images without prompt)."""
    written, existing, missing = 0, [], []
    for image in find_pngs(image_dir, recursive):
        caption_path = image.with_name(image.stem + extension)
        if caption_path.exists() and not overwrite:
            existing.append(image)
            continue
        info = read_png_info(image)
        if info is None or not info.prompt.strip():
            missing.append(image)
            continue
        _write_text_atomic(caption_path, info.prompt.strip() + "\n")
        written += 1
    return written, existing, missing


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    image_dir = Path(args.image_dir)
    extension = args.caption_extension if args.caption_extension.startswith(".") else "." + args.caption_extension
    try:
        if not image_dir.is_dir():
            raise UserError(f"--image_dir '{image_dir}' does not exist or is not a folder")
        if extension.lower() == ".png":
            raise UserError("--caption_extension .png would overwrite the images")
        written, existing, missing = write_captions(image_dir, extension, args.overwrite, args.recursive)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written} caption file(s); kept {len(existing)} existing (use --overwrite to replace them)")
    if missing:
        names = ", ".join(str(p.relative_to(image_dir)) for p in missing)
        print(f"{len(missing)} image(s) hold no prompt in their metadata: {names}", file=sys.stderr)
        if args.strict:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
