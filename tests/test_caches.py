"""Latent and text-encoder caches on the safetensors storage layer: reuse without pixel loading, rebuilds of stale
or corrupt files, atomic writes, refusals of incompatible augmentations."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import library.data.dataset as dataset_module
from library.cache import storage
from library.cache.latents import LatentCache, latent_cache_path
from library.cache.storage import (
    CacheCorrupt,
    load_tensors,
    read_metadata,
    save_tensors_atomic,
)
from library.cache.text_outputs import TextOutputCache, check_compatible
from library.data.dataset import TrainDataset
from library.data.types import DatasetConfig, ImageRecord, SubsetConfig
from library.errors import ConfigError

SIZES = [(64, 64), (128, 40), (40, 128), (70, 66)]


def write_png(path, w, h, seed=0, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return str(path)


def make_dataset(tmp_path, seed=0, **subset_kw) -> TrainDataset:
    d = tmp_path / "img"
    d.mkdir(exist_ok=True)
    records = []
    for i, (w, h) in enumerate(SIZES):
        path = d / f"{i}.png"
        if not path.exists():
            write_png(path, w, h, seed=i)
        records.append(ImageRecord(str(path), f"caption {i}", 0))
    sub = SubsetConfig(table="datasets[0].subsets[0]", image_dir=str(d), **subset_kw)
    cfg = DatasetConfig(table="datasets[0]", kind="dreambooth", resolution=(64, 64), batch_size=2,
                        enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                        subsets=[sub])
    return TrainDataset(cfg, [records], seed=seed)


class FakeEncoder:
    """8x average pooling to 4 channels: deterministic, shape-faithful, and it counts the images it sees."""

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += images.shape[0]
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def forbid_pixel_loading(monkeypatch):
    """From here on, any image decode in the dataset fails: proves that a step reads no pixels."""
    def refuse(*a, **k):
        raise AssertionError("image pixels were loaded")
    monkeypatch.setattr(dataset_module, "load_image", refuse)


# ---- storage ----------------------------------------------------------------------------------------------------

def test_storage_roundtrip_and_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "x.safetensors"
    save_tensors_atomic(str(path), {"a": torch.arange(6.0).view(2, 3)}, {"k": "v"})
    save_tensors_atomic(str(path), {"a": torch.ones(2)}, {"k": "w"})  # overwrite in place
    tensors, meta = load_tensors(str(path))
    assert torch.equal(tensors["a"], torch.ones(2)) and meta == {"k": "w"}
    assert read_metadata(str(path)) == {"k": "w"}
    assert os.listdir(path.parent) == ["x.safetensors"]


def test_storage_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    save_tensors_atomic(str(path), {"a": torch.zeros(3)}, {"v": "1"})

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_tensors_atomic(str(path), {"a": torch.ones(3)}, {"v": "2"})
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert load_tensors(str(path))[1] == {"v": "1"}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_storage_corrupt_detected(tmp_path, damage):
    path = tmp_path / "x.safetensors"
    save_tensors_atomic(str(path), {"a": torch.randn(64)}, {"k": "v"})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:-10], "garbage": b"\x05" * 100, "empty": b""}[damage])
    with pytest.raises(CacheCorrupt, match="x.safetensors"):
        load_tensors(str(path))


# ---- latents ----------------------------------------------------------------------------------------------------

def test_latent_disk_cache_reused_without_pixels(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path, flip_aug=True)
    enc = FakeEncoder()
    cache = LatentCache("fake-vae", "disk")
    assert cache.ensure(ds, enc, batch_size=2, progress=False) == len(SIZES)
    assert enc.images_seen == 2 * len(SIZES)  # plain + flipped
    for item in ds.items:
        path = latent_cache_path(item)
        assert os.path.dirname(path) == os.path.dirname(item.record.path)
        assert path.endswith(f"_{item.bucket[0]}x{item.bucket[1]}.latents.safetensors")
        meta = read_metadata(path)
        assert meta["encoder_id"] == "fake-vae" and meta["flip_included"] == "true"
        assert meta["bucket"] == "%dx%d" % item.bucket
    pixels_expected = {i: ds.load_item_pixels(i)[0] for i in range(len(ds.items))}

    # a fresh run: new dataset and cache objects, no pixels may be decoded
    forbid_pixel_loading(monkeypatch)
    ds2 = make_dataset(tmp_path, flip_aug=True)
    cache2 = LatentCache("fake-vae", "disk")
    enc2 = FakeEncoder()
    assert cache2.ensure(ds2, enc2, batch_size=2, progress=False) == 0 and enc2.images_seen == 0
    ds2.attach_latent_cache(cache2)
    for epoch in range(3):
        for b in ds2.epoch_batches(epoch):
            batch = ds2.load_batch(b, epoch)
            bw, bh = ds2.items[b[0]].bucket
            assert batch.images is None and batch.latents.shape == (len(b), 4, bh // 8, bw // 8)
            for row, (i, flipped) in enumerate(zip(b, batch.flipped)):
                px = pixels_expected[i]
                want = FakeEncoder()((px.flip(-1) if flipped else px)[None])[0]
                assert torch.allclose(batch.latents[row], want, atol=1e-6)
            assert batch.captions and batch.original_sizes and batch.crop_top_lefts


def test_stale_cache_rebuilt_after_image_changes(tmp_path):
    ds = make_dataset(tmp_path)
    cache = LatentCache("fake-vae", "disk")
    cache.ensure(ds, FakeEncoder(), 2, progress=False)
    changed = ds.items[1].record.path
    write_png(changed, *SIZES[1], seed=99)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    enc = FakeEncoder()
    ds = make_dataset(tmp_path)
    assert LatentCache("fake-vae", "disk").ensure(ds, enc, 2, progress=False) == 1
    cache = LatentCache("fake-vae", "disk")
    assert cache.ensure(ds, enc, 2, progress=False) == 0
    new = cache.get(1, False)
    assert torch.allclose(new, FakeEncoder()(ds.load_item_pixels(1)[0][None])[0], atol=1e-6)
    # another encoder identity invalidates every file
    assert LatentCache("other-vae", "disk").ensure(ds, FakeEncoder(), 2, progress=False) == len(SIZES)


def test_flip_needed_later_rebuilds(tmp_path):
    cache = LatentCache("fake-vae", "disk")
    cache.ensure(make_dataset(tmp_path), FakeEncoder(), 2, progress=False)
    assert LatentCache("fake-vae", "disk").ensure(make_dataset(tmp_path, flip_aug=True), FakeEncoder(), 2,
                                                  progress=False) == len(SIZES)
    # a cache holding more than needed (flipped latents) is still valid without flip_aug
    assert LatentCache("fake-vae", "disk").ensure(make_dataset(tmp_path), FakeEncoder(), 2, progress=False) == 0


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"junk"])
def test_corrupt_latent_file_rebuilt(tmp_path, damage):
    ds = make_dataset(tmp_path)
    LatentCache("fake-vae", "disk").ensure(ds, FakeEncoder(), 2, progress=False)
    path = latent_cache_path(ds.items[2])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    cache = LatentCache("fake-vae", "disk")
    assert cache.ensure(ds, FakeEncoder(), 2, progress=False) == 1
    assert cache.get(2, False).shape[0] == 4
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp")]


def test_memory_cache(tmp_path):
    ds = make_dataset(tmp_path, flip_aug=True)
    cache = LatentCache("fake-vae", "memory")
    assert cache.ensure(ds, FakeEncoder(), 3, progress=False) == len(SIZES)
    assert cache.ensure(ds, FakeEncoder(), 3, progress=False) == 0
    assert not [n for n in os.listdir(tmp_path / "img") if n.endswith(".safetensors")]
    assert torch.allclose(cache.get(0, True), FakeEncoder()(ds.load_item_pixels(0)[0].flip(-1)[None])[0])


def test_latent_cache_keeps_alpha_mask(tmp_path, monkeypatch):
    d = tmp_path / "img"
    d.mkdir()
    arr = np.full((64, 64, 4), 90, np.uint8)
    arr[:, :, 3] = 0
    arr[:, :16, 3] = 255
    Image.fromarray(arr, "RGBA").save(d / "0.png")
    for i, (w, h) in enumerate(SIZES[1:], start=1):
        write_png(d / f"{i}.png", w, h, seed=i)
    ds = make_dataset(tmp_path, alpha_mask=True, flip_aug=True)
    LatentCache("fake-vae", "disk").ensure(ds, FakeEncoder(), 2, progress=False)
    assert all(latent_cache_path(it).endswith(".alpha.latents.safetensors") for it in ds.items)
    assert "alpha_mask" in load_tensors(latent_cache_path(ds.items[0]))[0]

    forbid_pixel_loading(monkeypatch)
    cache = LatentCache("fake-vae", "disk")
    assert cache.ensure(ds, FakeEncoder(), 2, progress=False) == 0
    ds.attach_latent_cache(cache)
    for epoch in range(4):
        batch = ds.load_batch([0], epoch)
        cols = slice(48, 64) if batch.flipped[0] else slice(0, 16)
        assert batch.alpha_masks.shape == (1, 64, 64)
        assert torch.all(batch.alpha_masks[0, :, cols] == 1) and batch.alpha_masks.sum() == 64 * 16


@pytest.mark.parametrize("key", ["random_crop", "color_aug"])
def test_latent_cache_refuses_per_epoch_pixels(tmp_path, key):
    ds = make_dataset(tmp_path, **{key: True})
    with pytest.raises(ConfigError, match=rf"datasets\[0\]\.subsets\[0\].*{key}"):
        LatentCache("fake-vae", "disk").ensure(ds, FakeEncoder(), 2, progress=False)


def test_tiny_vae_latents(tmp_path):
    from diffusers import AutoencoderKL

    from library.models.tiny_configs import TINY_SDXL_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_SDXL_VAE).eval()

    def encode(images):
        return vae.encode(images).latent_dist.mode() * vae.config.scaling_factor

    ds = make_dataset(tmp_path)
    cache = LatentCache("tiny-sdxl-vae", "memory")
    cache.ensure(ds, encode, batch_size=2, progress=False)
    ds.attach_latent_cache(cache)
    for b in ds.epoch_batches(0):
        batch = ds.load_batch(b, 0)
        bw, bh = ds.items[b[0]].bucket
        assert batch.latents.shape == (len(b), 4, bh // 8, bw // 8)
        with torch.no_grad():
            direct = encode(torch.stack([ds.load_item_pixels(i)[0] for i in b]))
        assert torch.allclose(batch.latents, direct, atol=1e-4)


# ---- text-encoder outputs ---------------------------------------------------------------------------------------

class FakeTextEncoder:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, captions):
        self.calls.append(list(captions))
        lengths = torch.tensor([float(len(c)) for c in captions])
        return {"hidden": lengths[:, None, None].expand(-1, 3, 4).clone(), "pooled": lengths[:, None] * 2}


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_text_cache(tmp_path, mode):
    captions = ["a cat", "a dog", "a cat", "", "a long caption here"]
    enc = FakeTextEncoder()
    cache = TextOutputCache("te-1", mode, cache_dir=str(tmp_path / "te") if mode == "disk" else None)
    assert cache.ensure(captions, enc, batch_size=2, progress=False) == 4
    assert sorted(c for call in enc.calls for c in call) == sorted({*captions})
    out = cache.get("a dog")
    assert out["hidden"].shape == (3, 4) and float(out["pooled"]) == 10.0
    assert float(cache.get("")["pooled"]) == 0.0
    assert cache.ensure(captions, enc, batch_size=2, progress=False) == 0
    with pytest.raises(KeyError, match="never seen"):
        cache.get("never seen")


def test_text_disk_cache_reuse_and_corruption(tmp_path):
    cache_dir = str(tmp_path / "te")
    TextOutputCache("te-1", "disk", cache_dir).ensure(["x", "y"], FakeTextEncoder(), 8, progress=False)
    again = TextOutputCache("te-1", "disk", cache_dir)
    enc = FakeTextEncoder()
    assert again.ensure(["x", "y"], enc, 8, progress=False) == 0 and enc.calls == []
    assert read_metadata(again.path_for("x")) == {"format_version": "1", "encoder_id": "te-1", "caption": "x"}
    with open(again.path_for("y"), "wb") as f:
        f.write(b"broken")
    assert again.ensure(["x", "y"], enc, 8, progress=False) == 1 and enc.calls == [["y"]]
    other = TextOutputCache("te-2", "disk", cache_dir)
    assert other.path_for("x") != again.path_for("x")
    assert other.ensure(["x"], FakeTextEncoder(), 8, progress=False) == 1
    assert not [n for n in os.listdir(cache_dir) if n.startswith(".tmp")]


def test_text_cache_refuses_caption_ops():
    ok = SubsetConfig(table="datasets[0].subsets[0]", caption_prefix="photo of")
    check_compatible([ok])
    for key, value in [("shuffle_caption", True), ("caption_dropout_rate", 0.1),
                       ("caption_tag_dropout_rate", 0.2), ("caption_dropout_every_n_epochs", 3)]:
        bad = SubsetConfig(table="datasets[1].subsets[2]", **{key: value})
        with pytest.raises(ConfigError, match=r"datasets\[1\]\.subsets\[2\].*text-encoder"):
            TextOutputCache.check_compatible([ok, bad])


def test_dataset_fixed_captions_feed_text_cache(tmp_path):
    ds = make_dataset(tmp_path, caption_prefix="photo of")
    caps = ds.fixed_captions()
    assert caps == [f"photo of caption {i}" for i in range(len(SIZES))]
    cache = TextOutputCache("te", "memory")
    cache.ensure(caps, FakeTextEncoder(), 4, progress=False)
    for b in ds.epoch_batches(0):
        for c in ds.load_batch(b, 0).captions:
            assert cache.get(c)["hidden"].shape == (3, 4)


def test_image_shared_by_two_subsets_gets_one_file_with_flip(tmp_path):
    ds = make_dataset(tmp_path)
    plain = ds.config.subsets[0]
    flipping = SubsetConfig(table="datasets[0].subsets[1]", flip_aug=True)
    records = [[it.record for it in ds.items],
               [ImageRecord(it.record.path, it.record.caption, 1) for it in ds.items]]
    ds.config.subsets = [plain, flipping]
    shared = TrainDataset(ds.config, records, seed=0)
    enc = FakeEncoder()
    cache = LatentCache("fake-vae", "disk")
    assert cache.ensure(shared, enc, 4, progress=False) == len(SIZES)
    assert enc.images_seen == 2 * len(SIZES)
    n = len(SIZES)
    assert torch.equal(cache.get(0, False), cache.get(n, False))
    assert cache.get(0, True).shape == cache.get(0, False).shape
    assert LatentCache("fake-vae", "disk").ensure(shared, enc, 4, progress=False) == 0


# ---- provenance on every read, content identity, hostile files ----------------------------------------------------

class ScaledEncoder(FakeEncoder):
    """Another "VAE": same shapes, different latents."""

    def __call__(self, images):
        return super().__call__(images) * 3.0 + 1.0


def _hostile(kind: str, data: bytes) -> bytes:
    import json
    import struct

    if kind == "deep_json":  # 100k-deep nesting: json's recursion limit
        header = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
        return struct.pack("<Q", len(header)) + header
    if kind == "huge_length":
        return struct.pack("<Q", 2 ** 62) + data[8:]
    if kind == "truncated":
        return data[: len(data) - 7]
    if kind == "metadata_not_strings":
        header = json.dumps({"__metadata__": {"encoder_id": ["x"]}}).encode()
        return struct.pack("<Q", len(header)) + header
    if kind == "bad_offsets":
        header = json.dumps({"latents": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}).encode()
        return struct.pack("<Q", len(header)) + header + b"\0" * 16
    raise ValueError(kind)


HOSTILE = ["deep_json", "huge_length", "truncated", "metadata_not_strings", "bad_offsets"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_storage_hostile_headers_are_cache_corrupt(tmp_path, kind):
    path = tmp_path / "x.safetensors"
    save_tensors_atomic(str(path), {"a": torch.randn(64)}, {"k": "v"})
    path.write_bytes(_hostile(kind, path.read_bytes()))
    with pytest.raises(CacheCorrupt, match="x.safetensors"):
        read_metadata(str(path))
    with pytest.raises(CacheCorrupt, match="x.safetensors"):
        load_tensors(str(path))


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_latent_file_rebuilt_at_start_and_on_read(tmp_path, kind, caplog):
    ds = make_dataset(tmp_path)
    LatentCache("fake-vae", "disk").ensure(ds, FakeEncoder(), 2, progress=False)
    path = latent_cache_path(ds.items[1])
    good = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(_hostile(kind, good))
    cache = LatentCache("fake-vae", "disk")
    with caplog.at_level("WARNING"):
        assert cache.ensure(ds, FakeEncoder(), 2, progress=False) == 1
    assert "rebuilding 1 file(s)" in caplog.text and "unreadable: 1" in caplog.text
    with open(path, "wb") as f:  # damaged again while training: the read re-encodes instead of raising
        f.write(_hostile(kind, good))
    want = FakeEncoder()(ds.load_item_pixels(1)[0][None])[0]
    assert torch.allclose(cache.get(1, False), want, atol=1e-6)
    assert cache.rebuilt_on_read == 1 and read_metadata(path)["encoder_id"] == "fake-vae"


def test_shared_cache_with_another_vae_is_checked_on_every_read(tmp_path, caplog):
    """Two runs share the folder with different VAEs: B rewrites the files after A validated them at start-up.
    A must never train on B's latents: each read checks the provenance and re-encodes with A's VAE."""
    ds = make_dataset(tmp_path, flip_aug=True)
    enc_a, enc_b = FakeEncoder(), ScaledEncoder()
    cache_a = LatentCache("vae-A", "disk")
    assert cache_a.ensure(ds, enc_a, 2, progress=False) == len(SIZES)
    cache_b = LatentCache("vae-B", "disk")
    assert cache_b.ensure(make_dataset(tmp_path, flip_aug=True), enc_b, 2, progress=False) == len(SIZES)
    with caplog.at_level("WARNING"):
        for i in range(len(SIZES)):
            px = ds.load_item_pixels(i)[0]
            assert torch.allclose(cache_a.get(i, False), FakeEncoder()(px[None])[0], atol=1e-6)
            assert torch.allclose(cache_a.get(i, True), FakeEncoder()(px.flip(-1)[None])[0], atol=1e-6)
    assert cache_a.rebuilt_on_read == len(SIZES)
    assert "encoder_id differs" in caplog.text
    # and B, reading next, gets its own latents back
    px = ds.load_item_pixels(0)[0]
    assert torch.allclose(cache_b.get(0, False), ScaledEncoder()(px[None])[0], atol=1e-6)


def test_replaced_image_with_same_size_and_mtime_is_rebuilt(tmp_path):
    """The source is identified by its bytes: a replaced image that keeps the file size and mtime (a copy with
    preserved times, a re-export) still invalidates its latents."""
    d = tmp_path / "img"
    d.mkdir()
    path = d / "0.bmp"  # BMP: same dimensions, same file size
    Image.fromarray(np.full((64, 64, 3), 10, np.uint8)).save(path)
    st = os.stat(path)
    sub = SubsetConfig(table="datasets[0].subsets[0]", image_dir=str(d))
    cfg = DatasetConfig(table="datasets[0]", kind="dreambooth", resolution=(64, 64), subsets=[sub])

    def dataset():
        return TrainDataset(cfg, [[ImageRecord(str(path), "c", 0)]], seed=0)

    cache = LatentCache("fake-vae", "disk")
    assert cache.ensure(dataset(), FakeEncoder(), 1, progress=False) == 1
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    ds = dataset()
    fresh = LatentCache("fake-vae", "disk")
    assert fresh.ensure(ds, FakeEncoder(), 1, progress=False) == 1
    assert float(fresh.get(0, False).mean()) > 0.5  # the bright new image, not the dark old one
    assert read_metadata(latent_cache_path(ds.items[0]))["source_blake2b"]


def test_text_cache_checked_on_every_read(tmp_path, caplog):
    cache_dir = str(tmp_path / "te")
    cache = TextOutputCache("te-1", "disk", cache_dir)
    enc = FakeTextEncoder()
    cache.ensure(["x", "yy"], enc, 8, progress=False)
    # another writer puts another caption's outputs (and metadata) at "x"'s path, then a hostile file at "yy"'s
    save_tensors_atomic(cache.path_for("x"), FakeTextEncoder()(["zzzz"]) | {},
                        {"format_version": "1", "encoder_id": "te-1", "caption": "zzzz"})
    with open(cache.path_for("yy"), "wb") as f:
        f.write(_hostile("deep_json", b""))
    with caplog.at_level("WARNING"):
        assert float(cache.get("x")["pooled"]) == 2.0
        assert float(cache.get("yy")["pooled"]) == 4.0
    assert cache.rebuilt_on_read == 2 and "re-encoding" in caplog.text
    assert read_metadata(cache.path_for("x"))["caption"] == "x"
    assert cache.get("x")["hidden"].shape == (3, 4) and cache.rebuilt_on_read == 2


def test_identities_see_every_weight_and_the_tokenizer():
    from library.cache.provenance import (
        text_identity,
        tokenizer_digest,
        vae_identity,
        weights_digest,
    )

    torch.manual_seed(0)
    a = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(7)])
    b = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(7)])
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b[2].weight[3, 3] += 1e-3  # one weight, away from the first, middle and last tensors
    assert weights_digest(a) != weights_digest(b)
    assert vae_identity("fam", a) != vae_identity("fam", b)
    big = torch.nn.Linear(2048, 1024)  # above the full-hash size: sampled, still sensitive to a global change
    before = weights_digest(big)
    with torch.no_grad():
        big.weight.mul_(1.001)
    assert weights_digest(big) != before

    class Tok:
        def __init__(self, n, vocab):
            self.model_max_length, self.vocab = n, vocab

        def get_vocab(self):
            return self.vocab

    assert tokenizer_digest(Tok(77, {"a": 0})) != tokenizer_digest(Tok(256, {"a": 0}))
    assert tokenizer_digest(Tok(77, {"a": 0})) != tokenizer_digest(Tok(77, {"b": 0}))
    assert text_identity("f", [a], [Tok(77, {})]) != text_identity("f", [a], [Tok(78, {})])


# ---- through the training script --------------------------------------------------------------------------------

def test_shared_latent_cache_with_another_vae_has_no_cross_talk(tmp_path, tiny_sdxl_file):
    """Two sdxl_train_network.py runs share one --cache_latents_to_disk folder with different VAEs; the second
    run's losses equal a run with a fresh cache. The second VAE differs from the model's only inside the encoder, in
    a tensor that a fingerprint of a few tensors does not look at: only a hash over all weights tells them apart.
    The runs also clear stale temp files of a killed earlier run, and only those."""
    import json
    import time

    from conftest import build_shapes_dataset, run_script

    from library.families.interface import module_fingerprint
    from library.models.tiny import build_tiny_sdxl

    base_vae = build_tiny_sdxl(seed=0).vae
    other_vae = build_tiny_sdxl(seed=0).vae
    with torch.no_grad():
        other_vae.encoder.down_blocks[1].resnets[0].conv1.weight.mul_(-1.0)
    assert module_fingerprint(other_vae) == module_fingerprint(base_vae)  # the premise: a sampled hash is blind
    other_vae.save_pretrained(tmp_path / "vae2")
    shared = build_shapes_dataset(tmp_path / "shared")
    fresh = build_shapes_dataset(tmp_path / "fresh")

    old = time.time() - 7200
    stale = [os.path.join(shared["image_dir"], ".0.png.tmp-99-abcdefgh.safetensors"),
             str(tmp_path / "a" / ".l.safetensors.tmp-99-abcdefgh.safetensors")]
    live = os.path.join(shared["image_dir"], ".1.png.tmp-98-abcdefgh.safetensors")
    for path in stale + [live]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"half")
        if path != live:
            os.utime(path, (old, old))

    def train(name: str, ds: dict, vae: str | None = None) -> list[float]:
        args = ["--pretrained_model_name_or_path", tiny_sdxl_file, "--dataset_config", ds["config"],
                "--output_dir", str(tmp_path / name), "--output_name", "l", "--network_module", "networks.lora",
                "--network_dim", "4", "--max_train_steps", "4", "--seed", "1", "--cache_latents_to_disk",
                "--network_train_unet_only", "--loss_log_file", str(tmp_path / f"{name}.jsonl")]
        r = run_script("sdxl_train_network.py", *args, *(["--vae", vae] if vae else []))
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(line)["loss"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    first = train("a", shared)
    assert not any(os.path.exists(p) for p in stale) and os.path.exists(live)
    second = train("b", shared, str(tmp_path / "vae2"))
    reference = train("c", fresh, str(tmp_path / "vae2"))
    assert second == pytest.approx(reference, rel=1e-6, abs=1e-8)
    assert second != pytest.approx(first, rel=1e-4)
