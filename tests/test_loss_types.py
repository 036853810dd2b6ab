"""sd-scripts' --loss_type and --huber_* mathematics (library/train/loop_math.py), against values worked by hand from
sd-scripts' definitions. The trainer flags are not wired yet (tests/data/sd_scripts_flags/not_yet.json lists them)."""
from __future__ import annotations

import math

import pytest
import torch

from library.train.loop_math import elementwise_loss, huber_threshold


def test_loss_types_on_a_3_4_5_triangle():
    pred, target = torch.full((2, 1, 1, 1), 3.0), torch.zeros(2, 1, 1, 1)
    c = torch.tensor([4.0, 4.0])  # sqrt(3^2 + 4^2) = 5
    assert elementwise_loss(pred, target, "l2").flatten().tolist() == [9.0, 9.0]
    assert elementwise_loss(pred, target, "l1").flatten().tolist() == [3.0, 3.0]
    assert elementwise_loss(pred, target, "huber", c).flatten().tolist() == [8.0, 8.0]  # 2c(5 - c)
    assert elementwise_loss(pred, target, "smooth_l1", c).flatten().tolist() == [2.0, 2.0]  # 2(5 - c)


def test_huber_is_quadratic_near_zero_and_linear_far_away():
    c = torch.tensor([0.1])
    small = elementwise_loss(torch.full((1, 4), 1e-2), torch.zeros(1, 4), "huber", c)
    large = elementwise_loss(torch.full((1, 4), 100.0), torch.zeros(1, 4), "huber", c)
    assert small[0, 0].item() == pytest.approx(1e-4, rel=1e-2)  # ~ d^2
    assert large[0, 0].item() == pytest.approx(2 * 0.1 * 100.0, rel=1e-2)  # ~ 2c|d|


def test_per_sample_threshold_broadcasts_over_the_batch():
    pred, target = torch.full((2, 4, 8, 8), 3.0), torch.zeros(2, 4, 8, 8)
    loss = elementwise_loss(pred, target, "smooth_l1", torch.tensor([4.0, 0.0]))
    assert torch.allclose(loss[0], torch.full((4, 8, 8), 2.0)) and torch.allclose(loss[1], torch.full((4, 8, 8), 6.0))


def test_huber_schedules():
    t = torch.tensor([0, 500, 999])
    assert huber_threshold("constant", 0.1, 2.0, t).tolist() == pytest.approx([0.2, 0.2, 0.2])
    exp = huber_threshold("exponential", 0.1, 2.0, t, num_train_timesteps=1000)
    assert exp.tolist() == pytest.approx([2.0, 2.0 * 0.1 ** 0.5, 2.0 * 0.1 ** 0.999])
    ac = torch.tensor([0.5, 0.2, 0.8])  # sigma = 1, 2, 0.5
    snr = huber_threshold("snr", 0.1, 2.0, torch.tensor([0, 1, 2]), alphas_cumprod=ac)
    assert snr.tolist() == pytest.approx([0.9 / 4 + 0.1, 0.9 / 9 + 0.1, 0.9 / 2.25 + 0.1])
    with pytest.raises(ValueError, match="alphas_cumprod"):
        huber_threshold("snr", 0.1, 1.0, t)
    with pytest.raises(ValueError, match="unknown"):
        elementwise_loss(torch.zeros(1), torch.zeros(1), "l3")
    assert math.isfinite(exp.sum().item())
