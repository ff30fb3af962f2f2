"""Three parameter groups and optimizer construction."""

import pytest
import torch
from torch import nn

from trainer.models.yolo import build_model
from trainer.optim import BIAS_GROUP, build_optimizer, parameter_groups, set_momentum


@pytest.fixture(scope="module")
def model():
    return build_model("yolov5n", nc=3)


def test_groups_partition_every_parameter(model):
    bn, weights, biases = parameter_groups(model)
    ids = [id(p) for p in bn + weights + biases]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(bn) == n_bn
    assert len(weights) == n_conv
    assert len(biases) == n_bn + 3  # BN biases + the three Detect convs (the others have none)


@pytest.mark.parametrize("name,cls", [("SGD", torch.optim.SGD), ("Adam", torch.optim.Adam), ("AdamW", torch.optim.AdamW)])
def test_only_conv_weights_decay(model, name, cls):
    opt = build_optimizer(model, name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4, 0.0]
    if name == "SGD":
        assert opt.param_groups[0]["nesterov"] is True
    set_momentum(opt.param_groups[BIAS_GROUP], 0.8)
    key = "momentum" if name == "SGD" else "betas"
    value = opt.param_groups[BIAS_GROUP][key]
    assert (value if name == "SGD" else value[0]) == 0.8


def test_unknown_optimizer(model):
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "RMSprop", 0.01, 0.9, 0.0)
