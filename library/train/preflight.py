"""Checks that run before any model loads, so that a run fails in seconds instead of after hours of training.

Everything a run needs later and that can be validated cheaply is checked here, and every problem found is reported
at once in one `UserError` (a user with three broken images fixes them in one go, not in three restarts):

* `--output_name` is a plain file-name stem: every output file is `<output_dir>/<output_name><suffix>`, and a name
  with a separator or `..` would write outside `--output_dir`.
* `--output_dir` (and the folders of `--loss_log_file` and `--logging_dir`) can be created and written: a probe
  file is written and deleted, because a read-only folder is otherwise only found at the first save.
* `--network_module` imports and has `create_network`.
* `--sample_prompts` parses with every option, through the very function sampling uses, and the control images
  it names (`--cn`) exist; `--sample_sampler` is a known sampler name.
* Every training, validation and conditioning image opens and has a readable header. Formats whose container
  carries checksums (PNG) are verified without decoding pixels, which catches most truncated downloads (skipped
  with a disk latent cache, whose valid entries mean the images are not decoded again); a JPEG cut short after its
  header is only found when its pixels are decoded, during training (the loop then saves before it stops, see
  `library/train/rescue.py`).

Each process runs the same checks on the same inputs before the process group forms, so they fail together and
none waits for the others.
"""
from __future__ import annotations

import importlib
import logging
import os
import tempfile
import warnings
from typing import Iterable

from library.config.train_config import RunConfig
from library.errors import UserError

MAX_LISTED = 20  # beyond this, a long list of bad images is summarised


def check_output_name(output_name: str) -> str | None:
    """Why `output_name` is not a plain file-name stem, or None when it is."""
    seps = [s for s in (os.sep, os.altsep, "/", "\\") if s]
    if not output_name or not output_name.strip():
        return "--output_name is empty: give a file-name stem such as 'my_lora'"
    if any(s in output_name for s in seps) or output_name in (".", "..") or os.path.isabs(output_name) \
            or "\0" in output_name or (len(output_name) > 1 and output_name[1] == ":"):
        return (f"--output_name {output_name!r} is not a plain file name: it must not hold path separators, '..' "
                "or a drive, since every output is written as <output_dir>/<output_name>...; put the folder in "
                "--output_dir instead")
    return None


def check_writable_dir(path: str, flag: str) -> str | None:
    """Create `path` if needed, then write and delete a probe file in it; why that failed, or None."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".difftune-probe-", dir=path)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        return (f"{flag} {path}: the folder cannot be written ({reason}); choose a writable folder or fix its "
                "permissions (nothing would be saved otherwise)")
    return None


def check_loss_log(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        return f"--loss_log_file {path}: cannot be opened for writing ({e.strerror or e})"
    return None


def check_network_module(cfg: RunConfig) -> str | None:
    """A kohya-style network module must import and offer `create_network` (LLLite is built in)."""
    if cfg.network_kind != "lora":
        return None
    name = cfg.network.network_module
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # an ImportError, or any error raised while the module runs its top level
        return f"--network_module {name}: cannot import it ({type(e).__name__}: {e})"
    if not hasattr(mod, "create_network"):
        return f"--network_module {name}: the module has no create_network(); it is not a network module"
    return None


def check_sample_prompts(cfg: RunConfig) -> list[str]:
    """The prompt file parsed exactly as sampling will parse it (errors name the file and the line), the control
    images it names, and the sampler name."""
    from library.train.sampling import check_prompt_file, check_sampler

    s = cfg.sample
    if not s.sample_prompts:
        return []
    problems = [f"--sample_prompts: {p}" for p in check_prompt_file(s.sample_prompts, cfg.training.seed)]
    try:
        check_sampler(s.sample_sampler)
    except UserError as e:
        problems.append(f"--sample_sampler: {e}")
    return problems


def image_problem(path: str, verify: bool = True) -> str | None:
    """Why the image at `path` cannot be used: its header read as the dataset build reads it (the same errors,
    decompression bombs included) and, with `verify`, its checksums where the format has them (PNG: every chunk's
    CRC; this reads the whole file but decodes no pixels)."""
    from PIL import Image

    from library.data.images import ImageLoadError, image_size

    if not os.path.isfile(path):
        return f"{path}: missing"
    try:
        width, height = image_size(path)
    except ImageLoadError as e:
        return str(e)
    if width < 1 or height < 1:
        return f"{path}: empty image ({width}x{height})"
    if not verify:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the header read has judged the size
            with Image.open(path) as img:
                img.verify()  # a no-op for formats without checksums
    except Exception as e:  # PIL raises many types on damaged data (OSError, SyntaxError, struct.error, ...)
        return f"{path}: damaged, the file may be truncated ({type(e).__name__}: {e}); replace or remove it"
    return None


def dataset_image_paths(dataset_config: str) -> tuple[list[str], list[str]]:
    """Every image the dataset config names: (training, regularisation and validation images; conditioning
    images), each in order."""
    from library.config.dataset_schema import load_dataset_config
    from library.data import sources

    images: list[str] = []
    conditioning: list[str] = []
    # the dataset build right after this gives the config's and the captions' warnings, once
    quiet = [logging.getLogger(name) for name in ("library.config.dataset_schema", sources.__name__)]
    was_disabled = [q.disabled for q in quiet]
    for q in quiet:
        q.disabled = True
    try:
        group = load_dataset_config(dataset_config)
        for d in group.datasets:
            for records in sources.collect_records(d, group.source):
                for rec in records:
                    images.append(rec.path)
                    if rec.conditioning_path:
                        conditioning.append(rec.conditioning_path)
    finally:
        for q, was in zip(quiet, was_disabled):
            q.disabled = was
    return list(dict.fromkeys(images)), list(dict.fromkeys(conditioning))


def check_images(paths: Iterable[str], verify: bool = True) -> list[str]:
    return [p for p in (image_problem(path, verify) for path in paths) if p]


def format_image_problems(dataset_config: str, bad: list[str]) -> str:
    listed = bad[:MAX_LISTED]
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return (f"{dataset_config}: {len(bad)} image(s) cannot be read; fix or remove them:\n  "
            + "\n  ".join(listed) + more)


def preflight(cfg: RunConfig) -> None:
    """Raise one `UserError` listing everything that would make this run fail later; return quietly otherwise."""
    from library.train.fused_backward import check_fused_backward

    check_fused_backward(cfg)  # --fused_backward_pass with gradient accumulation or a pooled optimizer
    problems: list[str] = []
    name_problem = check_output_name(cfg.save.output_name)
    if name_problem:
        problems.append(name_problem)
    problems += [p for p in (check_writable_dir(cfg.save.output_dir, "--output_dir"),
                             check_writable_dir(cfg.log.logging_dir, "--logging_dir") if cfg.log.logging_dir else None,
                             check_loss_log(cfg.log.loss_log_file),
                             check_network_module(cfg)) if p]
    problems += check_sample_prompts(cfg)
    images, conditioning = dataset_image_paths(cfg.training.dataset_config)
    # with a disk latent cache, a valid cache entry means the image is never decoded again and a stale one is
    # re-encoded before step 1, so the header suffices (and a valid cache does not cost a read of every file);
    # otherwise pixels are decoded mid-epoch: verify them now. Conditioning images are never cached.
    bad_images = check_images(images, verify=not cfg.cache.cache_latents_to_disk) + check_images(conditioning)
    if bad_images:
        problems.append(format_image_problems(cfg.training.dataset_config, bad_images))
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} problems found before training:\n- " + "\n- ".join(problems))
