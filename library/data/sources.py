"""Turn a resolved DatasetConfig into ImageRecords: which images exist, their raw captions, their conditioning images.

Three sd-scripts dataset kinds are read here: DreamBooth (a folder plus per-image caption files or class_tokens),
fine-tuning (a metadata file: sd-scripts JSON, diffusers metadata.jsonl, or CSV) and ControlNet (a folder plus a
conditioning folder paired by file stem). Problems a user can fix (no images, no caption, a missing conditioning
image, a bad metadata line) are ConfigErrors naming the config file, the subset table and the path, raised before
any model is loaded.

Captions follow sd-scripts: an image without a caption file or captions.txt line takes the subset's class_tokens,
else trains with an empty caption; images with no caption or an empty caption file are counted and named in one
warning per subset instead of stopping the run.

Image keys in metadata files are, as in sd-scripts, paths relative to image_dir (or the metadata file's folder), with
or without extension, or absolute paths. An absolute path may point anywhere (it is read, and its latent cache is
written inside the subset's folder, see library.cache.latents); a relative key that climbs out of the folder it is
resolved in (`../../etc/x.png`) is refused: a metadata file received from elsewhere must not reach beyond the
dataset by accident or design.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
from typing import Iterable

from library.data.types import DatasetConfig, ImageRecord, SubsetConfig
from library.errors import ConfigError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".heic", ".heif")
CAPTIONS_TXT = "captions.txt"
CAPTIONS_TXT_SEPARATORS: tuple[str, ...] = ("\t", "|")

# Column / field names accepted in metadata files, in order of preference.
IMAGE_FIELDS: tuple[str, ...] = ("file_name", "image")
TEXT_FIELDS: tuple[str, ...] = ("text", "caption")
CONDITIONING_FIELDS: tuple[str, ...] = ("conditioning_image", "conditioning_file_name", "conditioning")

MAX_LISTED = 5  # how many offending names an error message lists

logger = logging.getLogger(__name__)

# One metadata entry: (image key, caption, conditioning key or None, where it is: "line 3" or "entry 'x'")
Entry = tuple[str, str, str | None, str]


def climbs_out(key: str) -> bool:
    """Whether relative path `key` leaves the folder it is resolved in (`..` beyond the top); either separator."""
    depth = 0
    for part in re.split(r"[\\/]+", key):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(directory: str) -> list[str]:
    """Images directly inside `directory` (not recursive, as sd-scripts), sorted so every run sees one order."""
    return sorted(
        os.path.join(directory, n)
        for n in os.listdir(directory)
        if is_image_file(n) and os.path.isfile(os.path.join(directory, n))
    )


def collect_records(dataset: DatasetConfig, source: str) -> list[list[ImageRecord]]:
    """One list of records per subset, each sorted by path, with the validation split marked."""
    result = []
    for index, subset in enumerate(dataset.subsets):
        reader = _SubsetReader(subset, index, source)
        if subset.metadata_file:  # fine-tuning, or ControlNet captioned by a metadata file
            records = reader.from_metadata()
        else:
            records = reader.from_folder()
        if dataset.kind == "controlnet":
            reader.pair_conditioning(records)
        if not records:
            where = subset.metadata_file or subset.image_dir
            raise ConfigError(f"no images found in {where}", file=source, table=subset.table,
                              key="metadata_file" if subset.metadata_file else "image_dir")
        records.sort(key=lambda r: r.path)
        mark_validation(records, subset.validation_split, subset.validation_seed)
        result.append(records)
    return result


def mark_validation(records: list[ImageRecord], fraction: float, seed: int | None) -> None:
    """Mark round(n * fraction) records as validation, chosen by a seeded shuffle of the sorted list.

    Mirrors sd-scripts (seeded shuffle, validation taken from the tail) on a sorted list, so the choice depends on
    the file names and the seed only, never on the order the file system lists them in.
    """
    if fraction <= 0 or len(records) < 2:
        return
    order = sorted(range(len(records)), key=lambda i: records[i].path)
    random.Random(0 if seed is None else seed).shuffle(order)
    count = min(len(records) - 1, round(len(records) * fraction))  # keep at least one training image
    for i in order[len(order) - count:] if count > 0 else ():
        records[i].split = "validation"


class _SubsetReader:
    """Readers for one subset; they share the subset's table and the config file name for messages."""

    def __init__(self, subset: SubsetConfig, index: int, source: str):
        self.subset = subset
        self.index = index
        self.source = source

    def error(self, message: str, key: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.source, table=self.subset.table, key=key)

    def record(self, path: str, caption: str, conditioning: str | None = None) -> ImageRecord:
        return ImageRecord(
            path=path,
            caption=caption,
            subset_index=self.index,
            is_reg=self.subset.is_reg,
            conditioning_path=conditioning,
        )

    # ---- DreamBooth / ControlNet: a folder of images --------------------------------------------------------

    def from_folder(self) -> list[ImageRecord]:
        directory = self.subset.image_dir
        assert directory is not None  # the schema requires it for these kinds
        images = list_images(directory)
        listing = self.read_captions_txt(directory)
        records, missing, empty = [], [], []
        for path in images:
            caption = self.read_caption_file(path)
            if caption == "":
                empty.append(os.path.basename(path))
            if caption is None:
                name = os.path.basename(path)
                caption = listing.get(name, listing.get(os.path.splitext(name)[0]))
            if caption is None:
                caption = self.subset.class_tokens
            if caption is None:  # as sd-scripts: train unconditioned rather than stop the run, but say so once
                missing.append(os.path.basename(path))
                caption = ""
            records.append(self.record(path, caption))
        if missing:
            logger.warning(
                "%s %s: %d image(s) in %s have no caption file (%s), no %s line and the subset has no class_tokens; "
                "they train with an empty caption: %s", self.source, self.subset.table, len(missing), directory,
                self.subset.caption_extension, CAPTIONS_TXT, _listing(missing))
        if empty:
            logger.warning("%s %s: %d caption file(s) in %s are empty; those images train with an empty caption: %s",
                           self.source, self.subset.table, len(empty), directory, _listing(empty))
        return records

    def read_caption_file(self, image_path: str) -> str | None:
        """The first line of `<stem><caption_extension>`, as sd-scripts reads it; None when there is no file."""
        cap_path = os.path.splitext(image_path)[0] + self.subset.caption_extension
        if not os.path.isfile(cap_path):
            return None
        try:
            with open(cap_path, encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError:
            raise self.error(f"caption file is not UTF-8 text: {cap_path}", key="caption_extension") from None
        return lines[0].strip() if lines else ""

    def read_captions_txt(self, directory: str) -> dict[str, str]:
        """`captions.txt` beside the images: `file<TAB or |>caption` per line; keyed by file name and by stem."""
        path = os.path.join(directory, CAPTIONS_TXT)
        if not os.path.isfile(path):
            return {}
        table: dict[str, str] = {}
        for lineno, line in _numbered_lines(path, self.error):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            sep = next((s for s in CAPTIONS_TXT_SEPARATORS if s in line), None)
            if sep is None:
                raise self.error(f"{path} line {lineno}: expected 'file name<TAB or |>caption', got {line!r}")
            name, caption = line.split(sep, 1)
            name = os.path.basename(name.strip())
            table[name] = caption.strip()
            table.setdefault(os.path.splitext(name)[0], caption.strip())
        return table

    # ---- ControlNet pairing ---------------------------------------------------------------------------------

    def pair_conditioning(self, records: list[ImageRecord]) -> None:
        """Give each record the conditioning image with the same stem (any image extension)."""
        cond_dir = self.subset.conditioning_data_dir
        assert cond_dir is not None
        by_stem: dict[str, str] = {}
        for path in list_images(cond_dir):
            by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], path)
        missing = []
        for rec in records:
            if rec.conditioning_path is not None:
                continue  # the metadata named it
            stem = os.path.splitext(os.path.basename(rec.path))[0]
            if stem in by_stem:
                rec.conditioning_path = by_stem[stem]
            else:
                missing.append(os.path.basename(rec.path))
        if missing:
            raise self.error(
                f"{len(missing)} image(s) have no conditioning image with the same name in {cond_dir}: "
                f"{_listing(missing)}",
                key="conditioning_data_dir",
            )

    # ---- fine-tuning: a metadata file -----------------------------------------------------------------------

    def from_metadata(self) -> list[ImageRecord]:
        path = self.subset.metadata_file
        assert path is not None
        ext = os.path.splitext(path)[1].lower()
        readers = {".json": self.read_json, ".jsonl": self.read_jsonl, ".csv": self.read_csv}
        if ext not in readers:
            raise self.error(f"unsupported metadata format {ext!r} (use .json, .jsonl or .csv): {path}",
                             key="metadata_file")
        entries = readers[ext](path)
        records, missing, seen, empty = [], [], set(), []
        for key, caption, cond, where in entries:
            for name, value in (("image", key), ("conditioning image", cond)):
                if isinstance(value, str) and not os.path.isabs(value) and climbs_out(value):
                    raise self.error(
                        f"{path} {where}: {name} path {value!r} leaves the dataset folder; relative paths must stay "
                        f"inside image_dir (or the metadata file's folder): move the image there or give an "
                        f"absolute path", key="metadata_file")
            image = self.find_image(key, path)
            if image is None:
                missing.append(key)
                continue
            if image in seen:
                continue  # one image, one record: a duplicated key would silently double its weight
            seen.add(image)
            if not caption:
                empty.append(key)
            conditioning = None
            if cond:
                conditioning = self.find_conditioning(cond, path)
            records.append(self.record(image, caption, conditioning))
        if missing:
            raise self.error(f"{len(missing)} image(s) named in {path} were not found: {_listing(missing)}",
                             key="metadata_file")
        if empty:
            logger.warning("%s %s: %d record(s) in %s have no caption; those images train with an empty caption: %s",
                           self.source, self.subset.table, len(empty), path, _listing(empty))
        return records

    def find_image(self, key: str, metadata_path: str) -> str | None:
        """sd-scripts looks an image key up as a path first, then as `<image_dir>/<key>[.<image ext>]`."""
        candidates = [key] if os.path.isabs(key) else []
        bases = [d for d in (self.subset.image_dir, os.path.dirname(metadata_path)) if d]
        candidates += [os.path.join(b, key) for b in bases]
        if not os.path.isabs(key):
            candidates.append(key)  # relative to the working directory
        for cand in candidates:
            if os.path.isfile(cand) and is_image_file(cand):
                return os.path.abspath(cand)
        for base in bases:
            for ext in IMAGE_EXTENSIONS:
                for variant in (ext, ext.upper()):
                    cand = os.path.join(base, key + variant)
                    if os.path.isfile(cand):
                        return os.path.abspath(cand)
        return None

    def find_conditioning(self, key: str, metadata_path: str) -> str:
        folders = (self.subset.conditioning_data_dir, self.subset.image_dir, os.path.dirname(metadata_path))
        bases = [d for d in folders if d]
        candidates = [key] if os.path.isabs(key) else [os.path.join(b, key) for b in bases]
        for cand in candidates:
            if os.path.isfile(cand):
                return os.path.abspath(cand)
        raise self.error(f"conditioning image {key!r} named in {metadata_path} was not found", key="metadata_file")

    def read_json(self, path: str) -> list[Entry]:
        """sd-scripts' metadata: {"<image key>": {"caption": ..., "tags": ...}}; caption + ", " + tags."""
        try:
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise self.error(f"{path} line {e.lineno}: invalid JSON: {e.msg}", key="metadata_file") from None
        except UnicodeDecodeError:
            raise self.error(f"{path} is not UTF-8 text", key="metadata_file") from None
        if not isinstance(data, dict):
            raise self.error(f"{path}: expected a JSON object mapping image keys to entries", key="metadata_file")
        entries = []
        for key, entry in data.items():
            if not isinstance(entry, dict):
                raise self.error(f"{path}: entry {key!r} must be an object with 'caption' and/or 'tags'",
                                 key="metadata_file")
            caption, tags = entry.get("caption"), entry.get("tags")
            if caption is None:
                caption, tags = tags, None
            if tags:
                caption = f"{caption}, {tags}"
            cond = next((entry[f] for f in CONDITIONING_FIELDS if entry.get(f)), None)
            entries.append((key, caption or "", cond, f"entry {key!r}"))
        return entries

    def read_jsonl(self, path: str) -> list[Entry]:
        """diffusers' metadata.jsonl: one {"file_name": ..., "text": ...} object per line."""
        entries = []
        for lineno, line in _numbered_lines(path, self.error):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise self.error(f"{path} line {lineno}: invalid JSON: {e.msg}", key="metadata_file") from None
            if not isinstance(obj, dict):
                raise self.error(f"{path} line {lineno}: expected a JSON object", key="metadata_file")
            entries.append(self.entry_from_row(obj, f"{path} line {lineno}") + (f"line {lineno}",))
        return entries

    def read_csv(self, path: str) -> list[Entry]:
        """CSV with a header: image (or file_name), text (or caption), optional conditioning column."""
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            raise self.error(f"{path}: cannot read CSV: {e}", key="metadata_file") from None
        return [self.entry_from_row(row, f"{path} line {i + 2}") + (f"line {i + 2}",) for i, row in enumerate(rows)]

    def entry_from_row(self, row: dict, where: str) -> tuple[str, str, str | None]:
        image = next((row[f] for f in IMAGE_FIELDS if row.get(f)), None)
        if image is None:
            raise self.error(f"{where}: no image column ({' or '.join(IMAGE_FIELDS)}); found {sorted(row)}",
                             key="metadata_file")
        text = next((row[f] for f in TEXT_FIELDS if row.get(f) is not None), "")
        cond = next((row[f] for f in CONDITIONING_FIELDS if row.get(f)), None)
        return str(image), str(text), (str(cond) if cond else None)


def _numbered_lines(path: str, error) -> Iterable[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None
    return enumerate(lines, start=1)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")
