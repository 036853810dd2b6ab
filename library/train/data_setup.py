"""From the run config to datasets and caches: config -> records -> datasets -> caches, one way.

Both steps also clear the temp files a killed earlier run left in the folders this run writes to (the output
folder, the image folders that hold latent caches, the text-encoder cache folder): see
library.fileio.remove_stale_temp_files."""
from __future__ import annotations

import os
from typing import Any

import torch

from library.config.train_config import RunConfig
from library.families.interface import FamilyModels, ModelFamily
from library.fileio import remove_stale_temp_files


def _clean_temp_files(folders: list[str | None]) -> None:
    """Remove stale atomic-write temp files (older than an hour, our own name pattern only) from `folders`."""
    removed = []
    for folder in dict.fromkeys(f for f in folders if f):
        removed += remove_stale_temp_files(folder)
    if removed:
        print(f"removed {len(removed)} temp file(s) left by an interrupted earlier run, e.g. {removed[0]}")


def build_datasets(cfg: RunConfig, num_processes: int = 1, verbose: bool = True) -> list[Any]:
    """With N processes each dataset forms global batches of N x batch_size from one bucket; every process then
    trains on its slice (see `local_slice`), so N processes x b train like 1 process x N*b."""
    from dataclasses import replace

    from library.cache.latents import EXTERNAL_CACHE_DIR
    from library.config.dataset_schema import load_dataset_config
    from library.data.dataset import TrainDataset
    from library.data.sources import collect_records

    group = load_dataset_config(cfg.training.dataset_config)
    roots = [s.image_dir or (os.path.dirname(s.metadata_file) if s.metadata_file else None)
             for d in group.datasets for s in d.subsets]
    _clean_temp_files([cfg.save.output_dir] + roots + [os.path.join(r, EXTERNAL_CACHE_DIR) for r in roots if r])
    datasets = []
    for d in group.datasets:
        records = collect_records(d, group.source)
        datasets.append(TrainDataset(replace(d, batch_size=d.batch_size * num_processes), records, cfg.training.seed))
    from library.data.debug_view import describe_datasets, warn_unsupported
    warn_unsupported(datasets, cfg.dataset.dataset_class, cfg.dataset.skip_cache_check)
    if cfg.dataset.debug_dataset:  # sd-scripts: show the dataset, then stop without training
        print(describe_datasets(datasets))
        raise SystemExit(0)
    if verbose:
        for ds in datasets:
            print(ds.format_bucket_histogram())
    return datasets


def local_slice(indices: tuple[int, ...], rank: int, world: int) -> list[int]:
    """This process's share of a global batch: contiguous, as even as possible (the first ranks take the rest)."""
    base, extra = divmod(len(indices), world)
    start = rank * base + min(rank, extra)
    return list(indices[start:start + base + (1 if rank < extra else 0)])


def setup_caches(cfg: RunConfig, family: ModelFamily, models: FamilyModels, datasets: list[Any], accelerator: Any,
                 trained_text_encoders: list[bool]) -> Any:
    """Fill the latent and text-encoder caches the flags ask for; return the text cache (or None).
    `trained_text_encoders` (one flag per encoder): the outputs of trained encoders are not cached, they run every
    step (library/train/text_cache_plan.py)."""
    from library.cache.latents import LatentCache
    from library.cache.provenance import text_identity, vae_identity
    from library.cache.text_outputs import TextOutputCache, check_compatible
    from library.train.text_cache_plan import plan_text_cache

    c = cfg.cache
    if c.cache_latents or c.cache_latents_to_disk:
        # every weight counts: two VAEs that a few sampled tensors cannot tell apart must not share latents
        vae_id = vae_identity(family.model_identity(models, "vae"), models.vae)
        for ds in datasets:
            cache = LatentCache(vae_id, "disk" if c.cache_latents_to_disk else "memory")

            @torch.no_grad()
            def encode(images: torch.Tensor) -> torch.Tensor:
                # the family moves the pixels to wherever the VAE is: the device while caching, the CPU when a
                # file found stale during training is re-encoded (the VAE is back on the CPU by then)
                return family.encode_images(models, images).float().cpu()

            if c.cache_latents_to_disk and accelerator.num_processes > 1:
                # each process writes a disjoint share of the files; then all read every file
                cache.ensure(ds, encode, c.vae_batch_size, progress=accelerator.is_local_main_process,
                             shard=(accelerator.process_index, accelerator.num_processes))
                accelerator.wait_for_everyone()
            cache.ensure(ds, encode, c.vae_batch_size, progress=accelerator.is_local_main_process)
            ds.attach_latent_cache(cache)
        models.vae.to("cpu")  # not needed on the device any more
    plan = plan_text_cache(bool(c.cache_text_encoder_outputs or c.cache_text_encoder_outputs_to_disk),
                           trained_text_encoders, family.text_outputs_by_encoder)
    if plan is None:
        return None
    for ds in datasets:
        check_compatible(s for s in ds.config.subsets)
    text_dir = c.text_encoder_cache_dir or os.path.join(cfg.save.output_dir, "te_cache")
    if c.cache_text_encoder_outputs_to_disk:
        _clean_temp_files([text_dir])
    text_id = text_identity(family.model_identity(models, "text"), models.text_encoders, models.tokenizers,
                            plan.outputs)
    cache = TextOutputCache(text_id, "disk" if c.cache_text_encoder_outputs_to_disk else "memory", cache_dir=text_dir,
                            outputs=plan.outputs, live_encoders=plan.live_encoders)
    cached_encoders = tuple(i for i in range(len(models.text_encoders)) if i not in plan.live_encoders)
    captions = list(dict.fromkeys(cap for ds in datasets for cap in ds.fixed_captions()))
    # --text_encoder_batch_size; sd-scripts' default is the dataset's batch size
    te_batch = max(1, getattr(c, "text_encoder_batch_size", None)
                   or max((ds.config.batch_size for ds in datasets), default=1))

    @torch.no_grad()
    def encode_text(batch: list[str]) -> dict[str, torch.Tensor]:
        with accelerator.autocast():
            out = family.encode_text(models, batch) if plan.outputs is None else \
                family.encode_text_part(models, batch, cached_encoders)
            return {k: v.float().cpu() for k, v in out.items()}

    if c.cache_text_encoder_outputs_to_disk and accelerator.num_processes > 1:
        cache.ensure(captions, encode_text, batch_size=te_batch,
                     progress=accelerator.is_local_main_process,
                     shard=(accelerator.process_index, accelerator.num_processes))
        accelerator.wait_for_everyone()
    cache.ensure(captions, encode_text, batch_size=te_batch, progress=accelerator.is_local_main_process)
    for i in cached_encoders:  # only sampling needs them from now on; it brings them back for the time it runs
        models.text_encoders[i].to("cpu")
    return cache
