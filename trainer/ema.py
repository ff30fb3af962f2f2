"""Exponential moving average of model weights (YOLOv5's ModelEMA maths).

The decay ramps up as `decay * (1 - exp(-updates / tau))`, so early averages follow the fast-moving
weights closely and later ones smooth over ~1/(1 - decay) steps.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP/compile wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(unwrap(model)).eval()
        self.decay, self.tau, self.updates = decay, tau, updates
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        return self.decay * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        source = unwrap(model).state_dict()
        # BN's num_batches_tracked is an int counter: not averaged. v*d + s*(1-d) is lerp(v, s, 1-d),
        # one multi-tensor call for every tensor instead of two kernels each.
        pairs = [(v, source[name].detach()) for name, v in self.ema.state_dict().items() if v.dtype.is_floating_point]
        if pairs:
            torch._foreach_lerp_([v for v, _ in pairs], [s.to(v.dtype) for v, s in pairs], 1 - d)

    def state_dict(self) -> dict:
        return {"model": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["model"])
        self.updates = int(state["updates"])
