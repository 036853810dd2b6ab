"""Write an sd-scripts dataset config (TOML) for one image folder, optionally with a conditioning folder.

Hand-writing the ``[general]`` / ``[[datasets]]`` / ``[[datasets.subsets]]`` layout is a common source of
"why is my dataset empty" errors; this writes a valid one from the folders and checks them on the way.

    python tools/write_dataset_config.py --image_dir D [--conditioning_data_dir C] [--caption_extension .txt]
        [--resolution 1024] [--batch_size 1] [--num_repeats 1] [--enable_bucket] --output dataset.toml
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

from library.config.toml_write import dumps_dataset_config  # noqa: E402
from library.errors import UserError  # noqa: E402
from library.fileio import write_text_atomic  # noqa: E402

try:  # Python 3.11+
    import tomllib as _toml_reader
except ImportError:  # Python 3.10: the toml package is already a dependency
    import toml as _toml_reader  # type: ignore[no-redef]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write an sd-scripts dataset config TOML for an image folder.")
    parser.add_argument("--image_dir", required=True, help="folder with the training images")
    parser.add_argument(
        "--conditioning_data_dir", help="folder with the conditioning images (ControlNet-LLLite), same file stems"
    )
    parser.add_argument("--caption_extension", default=".txt", help="caption file extension (default: .txt)")
    parser.add_argument("--class_tokens", help="caption for images without a caption file (DreamBooth style)")
    parser.add_argument("--resolution", default="1024", help="training resolution: N or W,H (default: 1024)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_repeats", type=int, default=1)
    parser.add_argument("--enable_bucket", action="store_true", help="enable aspect-ratio bucketing")
    parser.add_argument("--min_bucket_reso", type=int)
    parser.add_argument("--max_bucket_reso", type=int)
    parser.add_argument("--bucket_reso_steps", type=int)
    parser.add_argument("--bucket_no_upscale", action="store_true")
    parser.add_argument("--output", required=True, help="the TOML file to write")
    return parser


def _resolution(text: str) -> int | list[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--resolution '{text}': expected N or W,H (e.g. 1024 or 1024,768)") from None
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise UserError(f"--resolution '{text}': expected one or two positive numbers")
    return values[0] if len(values) == 1 else values


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"--{name} must be at least 1, got {value}")


def _folder(flag: str, value: str) -> str:
    path = Path(value)
    if not path.is_dir():
        raise UserError(f"--{flag} '{value}' does not exist or is not a folder")
    return path.resolve().as_posix()


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config as nested dicts (general -> datasets -> subsets), validated."""
    for name in ("batch_size", "num_repeats", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        _positive(name, getattr(args, name))
    extension = args.caption_extension if args.caption_extension.startswith(".") else "." + args.caption_extension
    general: dict[str, Any] = {"enable_bucket": bool(args.enable_bucket), "caption_extension": extension}
    dataset: dict[str, Any] = {"resolution": _resolution(args.resolution), "batch_size": args.batch_size}
    for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if getattr(args, name) is not None:
            dataset[name] = getattr(args, name)
    if args.bucket_no_upscale:
        dataset["bucket_no_upscale"] = True
    subset: dict[str, Any] = {"image_dir": _folder("image_dir", args.image_dir), "num_repeats": args.num_repeats}
    if args.conditioning_data_dir:
        subset["conditioning_data_dir"] = _folder("conditioning_data_dir", args.conditioning_data_dir)
    if args.class_tokens:
        subset["class_tokens"] = args.class_tokens
    dataset["subsets"] = [subset]
    return {"general": general, "datasets": [dataset]}


def to_toml(config: dict[str, Any]) -> str:
    """Render the sd-scripts layout (library/config/toml_write.py) and check that it parses."""
    text = dumps_dataset_config(config)
    _toml_reader.loads(text)  # never hand the user a file that does not parse
    return text


def _write_text_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = to_toml(build_config(args))
        _write_text_atomic(Path(args.output), text)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
