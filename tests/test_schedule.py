"""Warm-up, LR curve, accumulation and multi-scale sizes at given iterations (YOLOv5 facts)."""

import math
import random

import pytest
import torch

from trainer.schedule import (lr_factor, multiscale_size, nominal_accumulate, resize_batch,
                              scaled_weight_decay, warmup_iterations, warmup_step)


def test_cosine_lr_factor_endpoints_and_midpoint():
    lf = lr_factor(epochs=30, lrf=0.01)
    assert lf(0) == pytest.approx(1.0)
    assert lf(30) == pytest.approx(0.01)
    assert lf(15) == pytest.approx(0.5 * 0.99 + 0.01)
    assert lf(10) == pytest.approx(((1 + math.cos(math.pi / 3)) / 2) * 0.99 + 0.01)


def test_linear_lr_factor():
    lf = lr_factor(epochs=10, lrf=0.2, linear=True)
    assert [round(lf(x), 6) for x in (0, 5, 10)] == [1.0, 0.6, 0.2]


@pytest.mark.parametrize("bs,acc,wd", [(16, 4, 0.0005), (64, 1, 0.0005), (24, 3, 0.0005 * 24 * 3 / 64),
                                       (100, 1, 0.0005 * 100 / 64), (1, 64, 0.0005)])
def test_nominal_batch_accumulation_and_decay(bs, acc, wd):
    assert nominal_accumulate(bs) == acc
    assert scaled_weight_decay(0.0005, bs) == pytest.approx(wd)


def test_warmup_length_has_a_floor_of_100_iterations():
    assert warmup_iterations(3.0, 10) == 100
    assert warmup_iterations(3.0, 50) == 150
    assert warmup_iterations(0.0, 500) == 100


def _step(ni, nw=100, epoch_lr=(0.01, 0.01, 0.01), bs=16):
    return warmup_step(ni, nw, epoch_lr, bias_group=2, warmup_bias_lr=0.1, warmup_momentum=0.8,
                       momentum=0.937, total_batch_size=bs)


def test_warmup_start():
    s = _step(0)
    assert s.accumulate == 1
    assert s.lrs == (0.0, 0.0, 0.1)  # bias starts high, the others at zero
    assert s.momentum == pytest.approx(0.8)


def test_warmup_end_reaches_the_epoch_values():
    s = _step(100, epoch_lr=(0.009, 0.009, 0.009))
    assert s.accumulate == 4  # 64 / 16
    assert s.lrs == pytest.approx((0.009, 0.009, 0.009))
    assert s.momentum == pytest.approx(0.937)


def test_warmup_midpoint_and_quarter():
    mid = _step(50)
    assert mid.lrs == pytest.approx((0.005, 0.005, 0.1 + (0.01 - 0.1) / 2))
    assert mid.momentum == pytest.approx(0.8 + 0.137 / 2)
    assert mid.accumulate == 2  # interp gives 2.5, rounded half to even
    assert _step(25).accumulate == 2  # 1.75 -> 2
    assert _step(10).accumulate == 1  # 1.3 -> 1
    assert _step(90).accumulate == 4  # 3.7 -> 4


def test_warmup_with_a_big_batch_keeps_accumulate_one():
    assert {_step(ni, bs=128).accumulate for ni in range(0, 101, 10)} == {1}


@pytest.mark.parametrize("imgsz,stride", [(256, 32), (64, 32), (640, 32), (100, 32), (320, 64)])
def test_multiscale_sizes_are_stride_multiples_in_range(imgsz, stride):
    rng = random.Random(0)
    sizes = {multiscale_size(rng, imgsz, stride) for _ in range(2000)}
    assert all(s % stride == 0 for s in sizes)
    assert all(0.5 * imgsz <= s <= 1.5 * imgsz for s in sizes) or imgsz < 2 * stride
    expected = set(range(math.ceil(imgsz / 2 / stride) * stride, math.floor(1.5 * imgsz / stride) * stride + 1, stride))
    assert sizes == expected  # every legal size is reachable


def test_multiscale_is_reproducible_from_the_seed():
    """One generator per epoch: the sequence repeats from the same seed and moves along within it."""
    ra, rb = random.Random("7-3"), random.Random("7-3")
    a = [multiscale_size(ra, 256, 32) for _ in range(20)]
    b = [multiscale_size(rb, 256, 32) for _ in range(20)]
    assert a == b and len(set(a)) > 3  # the same sizes, and not one size repeated
    other = random.Random("7-4")
    assert [multiscale_size(other, 256, 32) for _ in range(20)] != a  # another epoch, other sizes


def test_resize_batch_keeps_aspect_within_stride_rounding():
    imgs = torch.rand(2, 3, 64, 96)
    out = resize_batch(imgs, 192, 32)
    assert out.shape == (2, 3, 128, 192)
    out = resize_batch(imgs, 48, 32)  # factor 0.5: 32 x 48 -> sides rounded up to 32 and 64
    assert out.shape == (2, 3, 32, 64)
    assert resize_batch(imgs, 96, 32) is imgs
