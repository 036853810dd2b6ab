"""Inspect a dataset config without loading a model: which images, which captions, which buckets, and why not.

    python tools/dataset_info.py --dataset_config dataset.toml [--json]
    python tools/dataset_info.py --train_data_dir train [--reg_data_dir reg] --resolution 1024 [--json]

The dataset flags are the trainers' own (library/config/dataset_flags.py): a dataset from the command line resolves
here exactly as `sdxl_train_network.py` would resolve it.

It resolves the config with the same functions training uses (schema -> sources -> buckets), so what it prints is
what a training run would see, and a config it rejects is rejected by training with the same message.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

import argparse  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

from library.config.args import new_parser  # noqa: E402
from library.config.dataset_flags import DatasetFlags  # noqa: E402
from library.config.dataset_schema import load_dataset_config  # noqa: E402
from library.config.dataset_source import DatasetSource, dataset_source_from_flags  # noqa: E402
from library.config.flags import add_flag_group  # noqa: E402
from library.data.buckets import BucketSpec, assign_bucket, bucket_histogram  # noqa: E402
from library.data.images import image_size  # noqa: E402  (the header reader training uses)
from library.data.sources import collect_records  # noqa: E402
from library.data.types import DatasetConfig  # noqa: E402
from library.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("Show how a dataset config resolves: images, captions and buckets.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a readable summary")
    add_flag_group(p, DatasetFlags)
    return p


def describe(source: str | DatasetSource) -> dict[str, Any]:
    """The report as plain data (the --json output), for a dataset TOML path or the dataset flags' source."""
    group = load_dataset_config(source)
    return {"datasets": [_describe_dataset(d, group.source) for d in group.datasets]}


def _describe_dataset(dataset: DatasetConfig, source: str) -> dict[str, Any]:
    spec = BucketSpec.from_dataset(dataset)
    per_subset = collect_records(dataset, source)
    subsets, images, assignments = [], [], []
    for subset, records in zip(dataset.subsets, per_subset):
        subsets.append(
            {
                "image_dir": subset.image_dir,
                "metadata_file": subset.metadata_file,
                "conditioning_data_dir": subset.conditioning_data_dir,
                "is_reg": subset.is_reg,
                "num_repeats": subset.num_repeats,
                "class_tokens": subset.class_tokens,
                "num_images": len(records),
                "num_validation": sum(r.split == "validation" for r in records),
            }
        )
        for rec in records:
            try:
                size = image_size(rec.path)
                assignment = assign_bucket(spec, size)
            except UserError as e:
                raise UserError(f"{source} / {subset.table}: {e}") from None
            assignments.append(assignment)
            images.append(
                {
                    "path": rec.path,
                    "bucket": list(assignment.bucket),
                    "original_size": list(size),
                    "resized_size": list(assignment.resized_size),
                    "caption": rec.caption,
                    "subset": rec.subset_index,
                    "split": rec.split,
                    "conditioning_path": rec.conditioning_path,
                }
            )
    return {
        "table": dataset.table,
        "kind": dataset.kind,
        "resolution": list(dataset.resolution),
        "batch_size": dataset.batch_size,
        "enable_bucket": dataset.enable_bucket,
        "bucket_no_upscale": dataset.bucket_no_upscale,
        "min_bucket_reso": dataset.min_bucket_reso,
        "max_bucket_reso": dataset.max_bucket_reso,
        "bucket_reso_steps": dataset.bucket_reso_steps,
        "subsets": subsets,
        "images": images,
        "buckets": [{"resolution": list(reso), "count": n} for reso, n in bucket_histogram(assignments)],
    }


def format_summary(report: dict[str, Any]) -> str:
    lines = []
    for i, d in enumerate(report["datasets"]):
        w, h = d["resolution"]
        bucketing = "on" + (" (no upscale)" if d["bucket_no_upscale"] else "") if d["enable_bucket"] else "off"
        lines.append(
            f"{d['table']}: {d['kind']}, resolution {w}x{h}, batch size {d['batch_size']}, bucketing {bucketing}"
        )
        for j, s in enumerate(d["subsets"]):
            where = s["image_dir"] or s["metadata_file"]
            role = "regularization" if s["is_reg"] else "training"
            extra = f", {s['num_validation']} for validation" if s["num_validation"] else ""
            lines.append(f"  subset {j}: {where}: {s['num_images']} images x {s['num_repeats']} repeats, {role}{extra}")
            if s["metadata_file"] and s["image_dir"]:
                lines.append(f"    metadata: {s['metadata_file']}")
            if s["conditioning_data_dir"]:
                lines.append(f"    conditioning: {s['conditioning_data_dir']}")
        lines.append("  buckets (images, without repeats):")
        for b in d["buckets"]:
            bw, bh = b["resolution"]
            lines.append(f"    {bw}x{bh}: {b['count']}")
        if i + 1 < len(report["datasets"]):
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = describe(dataset_source_from_flags(vars(args)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
