"""EMA decay ramp and update maths."""

import math

import pytest
import torch
from torch import nn

from trainer.ema import ModelEMA


def test_decay_ramp_values():
    ema = ModelEMA(nn.Linear(2, 2))
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema.decay_at(100) == pytest.approx(0.9999 * (1 - math.exp(-0.05)))
    assert ema.decay_at(10**6) == pytest.approx(0.9999)
    ramp = [ema.decay_at(u) for u in range(0, 20000, 500)]
    assert ramp == sorted(ramp)  # monotone


def test_update_blends_float_tensors_and_skips_counters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model)
    start = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(4, 3))  # moves BN running stats and num_batches_tracked
    for _ in range(3):
        ema.update(model)
    # After 3 updates each tensor is a known convex combination of start and the (fixed) model value.
    weight = 1.0
    for u in (1, 2, 3):
        weight *= ema.decay_at(u)
    src = model.state_dict()
    for k, v in ema.ema.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, weight * start[k] + (1 - weight) * src[k])
        else:
            assert torch.equal(v, start[k])  # num_batches_tracked is not averaged
    assert ema.updates == 3


def test_ema_state_round_trip():
    model = nn.Linear(2, 2)
    a = ModelEMA(model)
    a.update(model)
    b = ModelEMA(nn.Linear(2, 2))
    b.load_state_dict(a.state_dict())
    assert b.updates == 1
    for x, y in zip(a.ema.state_dict().values(), b.ema.state_dict().values()):
        assert torch.equal(x, y)
