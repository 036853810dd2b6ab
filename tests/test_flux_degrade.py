"""library.data.degrade: the synthetic degradations that make Kontext restoration pairs."""
from __future__ import annotations

import pytest
import torch

from library.data.degrade import DegradeSpec, degrade, gaussian_blur, parse_degrade_spec
from library.errors import ConfigError


def checkerboard(size: int = 32) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((x // 2 + y // 2) % 2).float()
    return board.expand(1, 3, size, size).clone()


def high_freq_energy(img: torch.Tensor) -> float:
    return float((img[..., :, 1:] - img[..., :, :-1]).abs().mean())


def test_parse_spec():
    spec = parse_degrade_spec("downsample=4, noise=0.05,blur=1.5,jpeg=30")
    assert spec == DegradeSpec(downsample=4, noise=0.05, blur=1.5, jpeg=30)
    assert parse_degrade_spec("").is_identity


@pytest.mark.parametrize("text, key", [
    ("sharpen=2", "sharpen"), ("downsample=2.5", "downsample"), ("jpeg=0", "jpeg"), ("noise=-1", "noise"),
    ("blur=abc", "blur"), ("downsample", None),
])
def test_bad_spec_names_the_flag_and_key(text, key):
    with pytest.raises(ConfigError) as e:
        parse_degrade_spec(text)
    assert "--kontext_degrade" in str(e.value)
    if key:
        assert f"'{key}'" in str(e.value)


def test_each_step_degrades_and_keeps_the_shape():
    img = checkerboard()
    sharp = high_freq_energy(img)
    for spec in (DegradeSpec(blur=1.5), DegradeSpec(downsample=4)):
        out = degrade(img, spec)
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
        assert high_freq_energy(out) < 0.7 * sharp, spec
    jpeg = degrade(img, DegradeSpec(jpeg=10))
    assert jpeg.shape == img.shape and float((jpeg - img).abs().mean()) > 0.02  # compression artefacts
    assert float((degrade(img, DegradeSpec(jpeg=95)) - img).abs().mean()) < float((jpeg - img).abs().mean())
    flat = torch.full((1, 3, 16, 16), 0.5)
    noisy = degrade(flat, DegradeSpec(noise=0.1), torch.Generator().manual_seed(0))
    assert 0.07 < float((noisy - flat).std()) < 0.13
    assert torch.equal(degrade(img, DegradeSpec()), img)


def test_blur_keeps_the_mean_and_noise_is_seeded():
    img = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    assert float(gaussian_blur(img, 2.0).mean()) == pytest.approx(float(img.mean()), abs=0.02)
    spec = parse_degrade_spec("noise=0.05,blur=1,downsample=2,jpeg=50")
    a = degrade(img, spec, torch.Generator().manual_seed(3))
    b = degrade(img, spec, torch.Generator().manual_seed(3))
    c = degrade(img, spec, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
