"""TrainDataset: epoch sampling (repeats, reg balancing, buckets, determinism) and batch loading (shapes, captions,
flip/crop alignment of conditioning images, alpha masks), driven by real tiny image files."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUCKETING, write_dataset_toml
from library.data.dataset import TrainDataset, balanced_repeats
from library.data.types import DatasetConfig, ImageRecord, SubsetConfig
from library.errors import ConfigError, UserError

# Buckets for resolution 64 with steps 32 and 32..128: 64x64, 96x32, 32x96, 128x32, 32x128.
SIZES = [(64, 64), (70, 70), (128, 40), (40, 128), (100, 36), (64, 60)]


def write_png(path, w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    arr = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return str(path)


def make_dataset_config(subsets, batch_size=2, kind="dreambooth", **kw):
    return DatasetConfig(table="datasets[0]", kind=kind, resolution=(64, 64), batch_size=batch_size,
                         enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                         subsets=subsets, **kw)


def image_set(tmp_path, name, sizes, subset_index, is_reg=False, seed=0):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    return [ImageRecord(write_png(d / f"{i}.png", w, h, seed=seed + i), f"{name} {i}", subset_index, is_reg)
            for i, (w, h) in enumerate(sizes)]


def simple_dataset(tmp_path, seed=0, batch_size=2, repeats=1, **subset_kw):
    sub = SubsetConfig(table="datasets[0].subsets[0]", image_dir=str(tmp_path / "a"), num_repeats=repeats,
                       **subset_kw)
    records = [image_set(tmp_path, "a", SIZES, 0)]
    return TrainDataset(make_dataset_config([sub], batch_size=batch_size), records, seed=seed)


def test_batches_single_bucket_with_right_shapes(tmp_path):
    ds = simple_dataset(tmp_path, batch_size=2, repeats=2)
    assert len(ds) == 12
    batches = ds.epoch_batches(0)
    assert len({ds.items[i].bucket for b in batches for i in b}) >= 3
    for batch in batches:
        buckets = {ds.items[i].bucket for i in batch}
        assert len(buckets) == 1
        (bw, bh), = buckets
        loaded = ds.load_batch(batch, epoch=0)
        assert loaded.images.shape == (len(batch), 3, bh, bw) and loaded.images.dtype == torch.float32
        assert loaded.images.min() >= -1 and loaded.images.max() <= 1
        assert loaded.target_sizes == [(bh, bw)] * len(batch)
        assert loaded.latents is None and loaded.conditioning_images is None and loaded.alpha_masks is None
        assert loaded.item_indices == batch and loaded.paths == [ds.items[i].record.path for i in batch]
        for i, orig, crop in zip(batch, loaded.original_sizes, loaded.crop_top_lefts):
            w, h = ds.items[i].original_size
            assert orig == (h, w)
            rw, rh = ds.items[i].resized_size
            assert 0 <= crop[0] <= rh - bh and 0 <= crop[1] <= rw - bw
    # full batches except at most the last of each bucket
    per_bucket = Counter(ds.items[b[0]].bucket for b in batches if len(b) < 2)
    assert all(n <= 1 for n in per_bucket.values())
    assert sum(len(b) for b in batches) == 12


def test_mixed_bucket_batch_refused(tmp_path):
    ds = simple_dataset(tmp_path)
    a = next(i for i, it in enumerate(ds.items) if it.bucket == (64, 64))
    b = next(i for i, it in enumerate(ds.items) if it.bucket != (64, 64))
    with pytest.raises(ValueError, match="one bucket"):
        ds.load_batch([a, b], 0)


def test_sizes_are_height_width(tmp_path):
    ds = simple_dataset(tmp_path)
    i = next(i for i, it in enumerate(ds.items) if it.original_size == (128, 40))
    batch = ds.load_batch([i], 0)
    assert batch.original_sizes == [(40, 128)]
    bw, bh = ds.items[i].bucket
    assert bw > bh and batch.target_sizes == [(bh, bw)]


def test_repeats_counted_per_item(tmp_path):
    ds = simple_dataset(tmp_path, repeats=3)
    counts = Counter(i for b in ds.epoch_batches(1) for i in b)
    assert len(ds) == 18 and set(counts.values()) == {3} and len(counts) == len(SIZES)
    assert sum(ds.bucket_histogram().values()) == 18
    assert "18 samples" in ds.format_bucket_histogram()


@pytest.mark.parametrize("is_reg,repeats,expected", [
    ([False] * 3 + [True] * 2, [2, 2, 2, 1, 1], [2, 2, 2, 3, 3]),  # 2 reg images cycled up to 6
    ([False] * 3 + [True] * 10, [2] * 3 + [1] * 10, [2, 2, 2] + [1] * 6 + [0] * 4),  # surplus reg unused
    ([False] * 3 + [True] * 2, [2, 2, 2, 4, 4], [2, 2, 2, 4, 4]),  # reg repeats kept on the first pass
    ([False, True, True, True], [1, 5, 5, 5], [1, 5, 0, 0]),
    ([False, False], [3, 1], [3, 1]),  # no reg
])
def test_balanced_repeats(is_reg, repeats, expected):
    assert balanced_repeats(is_reg, repeats) == expected


def test_reg_balanced_against_train(tmp_path):
    train = SubsetConfig(table="datasets[0].subsets[0]", num_repeats=2)
    reg = SubsetConfig(table="datasets[0].subsets[1]", is_reg=True)
    records = [image_set(tmp_path, "t", [(64, 64)] * 3, 0),
               image_set(tmp_path, "r", [(64, 64)] * 10, 1, is_reg=True, seed=50)]
    ds = TrainDataset(make_dataset_config([train, reg]), records, seed=0)
    assert len(ds) == 12
    counts = Counter(ds.items[i].record.is_reg for b in ds.epoch_batches(0) for i in b)
    assert counts == {False: 6, True: 6}
    assert sum(1 for it in ds.items if it.record.is_reg) == 6  # only the reg images needed

    few = [records[0], records[1][:2]]
    ds = TrainDataset(make_dataset_config([train, reg]), few, seed=0)
    counts = Counter(ds.items[i].record.path for b in ds.epoch_batches(0) for i in b)
    assert [counts[r.path] for r in few[1]] == [3, 3]


def test_order_deterministic_per_seed_and_epoch(tmp_path):
    a = simple_dataset(tmp_path, seed=5, repeats=3, batch_size=1)
    b = simple_dataset(tmp_path, seed=5, repeats=3, batch_size=1)
    assert a.epoch_batches(2) == b.epoch_batches(2)
    assert a.epoch_batches(2) != a.epoch_batches(3)
    assert a.epoch_batches(2) != simple_dataset(tmp_path, seed=6, repeats=3, batch_size=1).epoch_batches(2)


def test_last_batch_of_bucket_smaller(tmp_path):
    sub = SubsetConfig(table="datasets[0].subsets[0]")
    ds = TrainDataset(make_dataset_config([sub], batch_size=2), [image_set(tmp_path, "a", [(64, 64)] * 3, 0)], 0)
    assert sorted(len(b) for b in ds.epoch_batches(0)) == [1, 2]


def test_captions_processed_and_reproducible(tmp_path):
    ds = simple_dataset(tmp_path, caption_prefix="photo of", shuffle_caption=True)
    batch = ds.epoch_batches(0)[0]
    first = ds.load_batch(batch, 0).captions
    assert first == ds.load_batch(batch, 0).captions
    assert all(c.replace(",", "").split() and "photo" in c for c in first)


def test_flip_deterministic_and_mirrors_pixels(tmp_path):
    ds = simple_dataset(tmp_path, flip_aug=True)
    flips = [ds.load_batch([0], e).flipped[0] for e in range(40)]
    assert 8 < sum(flips) < 32
    assert flips == [ds.load_batch([0], e).flipped[0] for e in range(40)]
    e_plain, e_flip = flips.index(False), flips.index(True)
    plain, flipped = ds.load_batch([0], e_plain), ds.load_batch([0], e_flip)
    assert torch.equal(flipped.images, plain.images.flip(-1))
    no_aug = ds.load_batch([0], e_flip, augment=False)
    assert no_aug.flipped == [False] and torch.equal(no_aug.images, plain.images)


def test_color_aug_deterministic(tmp_path):
    ds = simple_dataset(tmp_path, color_aug=True)
    plain = ds.load_batch([0], 0, augment=False).images
    per_epoch = [ds.load_batch([0], e).images for e in range(4)]
    assert all(torch.equal(x, ds.load_batch([0], e).images) for e, x in enumerate(per_epoch))
    assert any(not torch.equal(x, plain) for x in per_epoch)
    assert all(x.shape == plain.shape for x in per_epoch)


def _controlnet_dataset(tmp_path, cond_scale: int):
    """Images with 8-px colour blocks; each conditioning image is the same picture (optionally enlarged by an
    integer factor with nearest neighbour, which area-downscaling recovers exactly)."""
    (tmp_path / "img").mkdir()
    (tmp_path / "cond").mkdir()
    records = []
    for i, (w, h) in enumerate([(128, 72), (72, 128), (96, 96)]):
        rng = np.random.default_rng(i)
        blocks = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        arr = blocks.repeat(8, 0).repeat(8, 1)
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        big = arr.repeat(cond_scale, 0).repeat(cond_scale, 1)
        Image.fromarray(big).save(tmp_path / "cond" / f"{i}.png")
        records.append(ImageRecord(str(tmp_path / "img" / f"{i}.png"), "c", 0,
                                   conditioning_path=str(tmp_path / "cond" / f"{i}.png")))
    sub = SubsetConfig(table="datasets[0].subsets[0]", conditioning_data_dir=str(tmp_path / "cond"),
                       random_crop=True, flip_aug=True)
    return TrainDataset(make_dataset_config([sub], batch_size=1, kind="controlnet"), [records], seed=3)


@pytest.mark.parametrize("cond_scale", [1, 2])
def test_conditioning_image_stays_aligned(tmp_path, cond_scale):
    ds = _controlnet_dataset(tmp_path, cond_scale)
    crops, flips = set(), set()
    for epoch in range(12):
        for batch in ds.epoch_batches(epoch):
            loaded = ds.load_batch(batch, epoch)
            cond = loaded.conditioning_images
            assert cond is not None and cond.shape == loaded.images.shape
            assert cond.min() >= 0 and cond.max() <= 1
            assert torch.allclose((loaded.images + 1) / 2, cond, atol=1e-6)
            crops.add((batch[0], loaded.crop_top_lefts[0]))
            flips.add(loaded.flipped[0])
    assert flips == {True, False}
    assert len(crops) > len(ds.items) + 2  # random crops really moved


def test_alpha_mask(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    arr = np.full((64, 64, 4), 100, np.uint8)
    arr[:, :, 3] = 0
    arr[:, :16, 3] = 255  # opaque left quarter
    Image.fromarray(arr, "RGBA").save(d / "rgba.png")
    write_png(d / "opaque.png", 64, 64)
    records = [[ImageRecord(str(d / "rgba.png"), "x", 0), ImageRecord(str(d / "opaque.png"), "y", 0)]]
    sub = SubsetConfig(table="datasets[0].subsets[0]", alpha_mask=True, flip_aug=True)
    ds = TrainDataset(make_dataset_config([sub]), records, seed=0)
    for epoch in range(6):
        batch = ds.load_batch([0, 1], epoch)
        m = batch.alpha_masks
        assert m.shape == (2, 64, 64)
        opaque_cols = slice(48, 64) if batch.flipped[0] else slice(0, 16)
        assert torch.all(m[0, :, opaque_cols] == 1) and m[0].sum() == 64 * 16
        assert torch.all(m[1] == 1)
    # without alpha_mask the transparent part is composited on white
    sub.alpha_mask = False
    ds = TrainDataset(make_dataset_config([sub]), records, seed=0)
    batch = ds.load_batch([0], 0, augment=False)
    assert batch.alpha_masks is None and torch.all(batch.images[0, :, :, 32:] == 1.0)


def test_validation_split_kept_apart(tmp_path):
    records = image_set(tmp_path, "a", SIZES, 0)
    records[1].split = records[4].split = "validation"
    sub = SubsetConfig(table="datasets[0].subsets[0]", num_repeats=2)
    ds = TrainDataset(make_dataset_config([sub]), [records], seed=0)
    val_paths = {records[1].path, records[4].path}
    assert {it.record.path for it in ds.validation_items} == val_paths
    assert len(ds) == 8
    trained = {ds.items[i].record.path for b in ds.epoch_batches(0) for i in b}
    assert not trained & val_paths
    for b in ds.validation_batches():
        assert ds.load_batch(b, 0, augment=False).images.shape[0] == len(b)


def test_corrupt_image_named(tmp_path):
    records = image_set(tmp_path, "a", SIZES[:2], 0)
    (tmp_path / "a" / "0.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="0.png"):
        TrainDataset(make_dataset_config([SubsetConfig(table="datasets[0].subsets[0]")]), [records], seed=0)
    # corrupted after the dataset was built: the batch load names it
    write_png(tmp_path / "a" / "0.png", 64, 64)
    ds = TrainDataset(make_dataset_config([SubsetConfig(table="datasets[0].subsets[0]")]), [records], seed=0)
    (tmp_path / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(UserError, match="0.png"):
        ds.load_batch([0], 0)


def test_only_reg_images_is_config_error(tmp_path):
    reg = SubsetConfig(table="datasets[0].subsets[0]", is_reg=True)
    with pytest.raises(ConfigError, match=r"datasets\[0\]"):
        TrainDataset(make_dataset_config([reg]), [image_set(tmp_path, "r", [(64, 64)], 0, is_reg=True)], 0)


def test_from_toml_config(tmp_path):
    """End to end through the dataset-config schema and the record collector."""
    from library.config.dataset_schema import load_dataset_config
    from library.data.sources import collect_records

    img = tmp_path / "img"
    img.mkdir()
    for i, (w, h) in enumerate([(64, 64), (128, 40), (40, 128)]):
        write_png(img / f"{i}.png", w, h, seed=i)
    toml = write_dataset_toml(tmp_path / "dataset.toml", {"resolution": 64, "batch_size": 2, "subsets": [
        {"image_dir": str(img), "class_tokens": "sks dog", "num_repeats": 2}]}, general=BUCKETING)
    group = load_dataset_config(str(toml))
    dataset_cfg = group.datasets[0]
    ds = TrainDataset(dataset_cfg, collect_records(dataset_cfg, group.source), seed=0)
    assert len(ds) == 6
    for b in ds.epoch_batches(0):
        batch = ds.load_batch(b, 0)
        assert batch.captions == ["sks dog"] * len(b)
        assert batch.images.shape[0] == len(b)
