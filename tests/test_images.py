"""Image loading and bucket fitting, driven by real tiny files of each supported format."""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from library.data.images import ImageLoadError, image_size, load_image, resize_and_crop
from library.errors import UserError


def _halves(w: int, h: int, left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2:] = right
    return Image.fromarray(arr)


@pytest.mark.parametrize("ext,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP"), (".bmp", "BMP")])
@pytest.mark.parametrize("size", [(64, 64), (96, 48), (40, 120)])
def test_formats_and_aspect_ratios(tmp_path, ext, fmt, size):
    path = tmp_path / f"img{ext}"
    _halves(*size).save(path, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    loaded = load_image(str(path))
    assert loaded.rgb.shape == (size[1], size[0], 3) and loaded.rgb.dtype == np.uint8
    assert loaded.alpha is None
    assert image_size(str(path)) == size
    # left half red, right half blue (lossy formats within tolerance)
    assert loaded.rgb[size[1] // 2, 2, 0] > 200 and loaded.rgb[size[1] // 2, -3, 2] > 200


def test_heic(tmp_path):
    path = tmp_path / "phone.heic"
    Image.new("RGB", (48, 32), (200, 30, 30)).save(path, "HEIF", quality=95)
    loaded = load_image(str(path))
    assert loaded.rgb.shape == (32, 48, 3)
    assert abs(int(loaded.rgb[10, 10, 0]) - 200) < 12 and loaded.rgb[10, 10, 1] < 60
    assert image_size(str(path)) == (48, 32)


def test_exif_orientation_applied(tmp_path):
    """Stored 80x40 (red left, blue right) with orientation 6 (rotate 90 clockwise): shown 40x80, red on top."""
    path = tmp_path / "rotated.jpg"
    img = _halves(80, 40)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    assert image_size(str(path)) == (40, 80)
    rgb = load_image(str(path)).rgb
    assert rgb.shape == (80, 40, 3)
    assert rgb[5, 20, 0] > 200 and rgb[5, 20, 2] < 60  # top: red
    assert rgb[-5, 20, 2] > 200 and rgb[-5, 20, 0] < 60  # bottom: blue


def test_rgba_composited_on_white_or_returned_as_mask(tmp_path):
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[..., 0] = 10  # dark red colour everywhere
    arr[:, :16, 3] = 255  # left opaque, right fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(path)

    flat = load_image(str(path))
    assert flat.alpha is None
    assert tuple(flat.rgb[5, 5]) == (10, 0, 0)
    assert tuple(flat.rgb[5, 30]) == (255, 255, 255)

    masked = load_image(str(path), alpha_mask=True)
    assert masked.alpha.dtype == np.float32 and masked.alpha.shape == (32, 32)
    assert masked.alpha[5, 5] == 1.0 and masked.alpha[5, 30] == 0.0
    assert tuple(masked.rgb[5, 30]) == (10, 0, 0)  # colour kept as stored: the mask excludes it from the loss


def test_opaque_image_with_alpha_mask_gets_full_mask(tmp_path):
    path = tmp_path / "rgb.png"
    _halves(16, 16).save(path)
    assert np.all(load_image(str(path), alpha_mask=True).alpha == 1.0)


def test_palette_transparency(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    rgb = load_image(str(path)).rgb
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[0, 7]) == (255, 255, 255)


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_corrupt_image_names_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match="broken.png"):
        load_image(str(path))
    with pytest.raises(UserError, match="broken.png"):
        image_size(str(path))


def test_truncated_png_names_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(str(path))


@pytest.mark.parametrize("ext,fmt,keep", [(".jpg", "JPEG", 0.5), (".webp", "WEBP", 0.5), (".gif", "GIF", 0.3),
                                          (".bmp", "BMP", 0.5), (".png", "PNG", 0.9)])
def test_truncated_files_of_every_format_are_user_errors_with_the_path(tmp_path, ext, fmt, keep):
    """Whatever a decoder raises on a cut file (OSError, EOFError, ValueError, ...) reaches the user as one
    ImageLoadError naming the path, from the decode path itself (not only from a header check)."""
    path = tmp_path / f"cut{ext}"
    arr = np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageLoadError, match=f"cut{ext}.*(truncated|damaged)"):
        load_image(str(path))


def test_decompression_bomb_is_a_user_error_naming_the_file(tmp_path, monkeypatch, caplog):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 10000 pixels > 2x the limit: Pillow's error
    with pytest.raises(ImageLoadError, match=r"bomb\.png.*decompression bomb.*downscale"):
        image_size(str(path))
    with pytest.raises(ImageLoadError, match=r"bomb\.png.*decompression bomb"):
        load_image(str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)  # between 1x and 2x: Pillow's warning, one line, named
    with caplog.at_level("WARNING"):
        assert image_size(str(path)) == (100, 100)
    assert "bomb.png" in caplog.text and "decompression-bomb" in caplog.text
    assert load_image(str(path)).rgb.shape == (100, 100, 3)


def test_extreme_aspect_image_refused_before_any_allocation(tmp_path, monkeypatch):
    """40000x1 would be resized to 10240000x256 (7.9 GB) to cover a 1024x256 bucket: refused while the dataset is
    built, with the path, before any pixel is decoded."""
    import library.data.dataset as dataset_module
    from library.data.buckets import BucketError
    from library.data.dataset import TrainDataset
    from library.data.types import DatasetConfig, ImageRecord, SubsetConfig

    strip = tmp_path / "strip.png"
    Image.new("RGB", (40000, 1), (9, 9, 9)).save(strip)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (1200, 300)).save(ok)

    def no_decode(*a, **k):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(dataset_module, "load_image", no_decode)
    sub = SubsetConfig(table="datasets[0].subsets[0]", image_dir=str(tmp_path))
    for bucketing in (True, False):
        cfg = DatasetConfig(table="datasets[0]", kind="dreambooth", resolution=(1024, 1024), enable_bucket=bucketing,
                            subsets=[sub])
        with pytest.raises(BucketError, match=r"strip\.png.*40000x1.*too elongated"):
            TrainDataset(cfg, [[ImageRecord(str(ok), "", 0), ImageRecord(str(strip), "", 0)]], seed=0)
        ds = TrainDataset(cfg, [[ImageRecord(str(ok), "", 0)]], seed=0)  # a 4:1 image is fine either way
        assert ds.items[0].resized_size[0] * ds.items[0].resized_size[1] <= 16 * 1024 * 1024


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png"):
        load_image(str(tmp_path / "nope.png"))


def test_resize_and_crop_center_and_random():
    arr = np.arange(60 * 100 * 3, dtype=np.uint32).reshape(60, 100, 3).astype(np.uint8)
    out, top_left = resize_and_crop(arr, (100, 60), (64, 60), "center")
    assert out.shape == (60, 64, 3) and top_left == (0, 18)
    assert np.array_equal(out, arr[:, 18:82])

    seen = set()
    for seed in range(20):
        out, (top, left) = resize_and_crop(arr, (100, 60), (64, 60), "random", random.Random(seed))
        assert top == 0 and 0 <= left <= 36
        assert np.array_equal(out, arr[:, left:left + 64])
        seen.add(left)
    assert len(seen) > 3
    a = resize_and_crop(arr, (100, 60), (64, 60), "random", random.Random(7))[1]
    assert a == resize_and_crop(arr, (100, 60), (64, 60), "random", random.Random(7))[1]


def test_resize_down_and_up():
    arr = np.full((40, 80, 3), 128, np.uint8)
    down, _ = resize_and_crop(arr, (32, 16), (32, 16))
    up, _ = resize_and_crop(arr, (160, 80), (128, 64))
    assert down.shape == (16, 32, 3) and up.shape == (64, 128, 3)
    assert np.all(down == 128) and np.all(np.abs(up.astype(int) - 128) <= 1)
    with pytest.raises(ValueError):
        resize_and_crop(arr, (32, 16), (64, 64))
