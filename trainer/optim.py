"""Optimizer with YOLOv5's three parameter groups.

Group 0: BatchNorm weights (no decay); group 1: other weights (decay); group 2: biases (no decay,
and a high warm-up lr). The warm-up code relies on this order (`BIAS_GROUP`).
"""

from __future__ import annotations

import torch
from torch import nn

BIAS_GROUP = 2


def parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    bn_weights, weights, biases = [], [], []
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            biases.append(bias)
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            (bn_weights if isinstance(module, nn.modules.batchnorm._BatchNorm) else weights).append(weight)
    return bn_weights, weights, biases


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov), Adam or AdamW over the three groups; decay applies to group 1 only."""
    bn_weights, weights, biases = parameter_groups(model)
    if name == "SGD":
        opt = torch.optim.SGD(bn_weights, lr=lr, momentum=momentum, nesterov=True)
    elif name == "Adam":
        opt = torch.optim.Adam(bn_weights, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        opt = torch.optim.AdamW(bn_weights, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected SGD, Adam or AdamW")
    opt.add_param_group({"params": weights, "weight_decay": weight_decay})
    opt.add_param_group({"params": biases, "weight_decay": 0.0})
    return opt


def set_momentum(group: dict, value: float) -> None:
    """SGD momentum or Adam beta1."""
    if "momentum" in group:
        group["momentum"] = value
    elif "betas" in group:
        group["betas"] = (value, group["betas"][1])
