"""Pure schedule functions of the iteration: LR curve, warm-up, accumulation and multi-scale sizes.

`ni` is the global iteration (batches seen since epoch 0), `nw` the warm-up length in iterations.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

NOMINAL_BATCH = 64  # gradients are accumulated until ~64 images contribute to each step


def lr_factor(epochs: int, lrf: float, linear: bool = False) -> Callable[[float], float]:
    """Multiplier of lr0 at an epoch: cosine (default) or linear from 1 down to `lrf`."""
    if linear:
        return lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf
    return lambda x: ((1 + math.cos(x * math.pi / epochs)) / 2) * (1 - lrf) + lrf


def nominal_accumulate(total_batch_size: int, nbs: int = NOMINAL_BATCH) -> int:
    """Batches per optimizer step once warm-up is over."""
    return max(round(nbs / total_batch_size), 1)


def scaled_weight_decay(weight_decay: float, total_batch_size: int, nbs: int = NOMINAL_BATCH) -> float:
    """Weight decay tuned for 64 images per step, rescaled to the images actually per step."""
    return weight_decay * total_batch_size * nominal_accumulate(total_batch_size, nbs) / nbs


def warmup_iterations(warmup_epochs: float, batches_per_epoch: int, minimum: int = 100) -> int:
    return max(round(warmup_epochs * batches_per_epoch), minimum)


@dataclass(frozen=True)
class WarmupStep:
    accumulate: int
    lrs: tuple[float, ...]  # one per parameter group
    momentum: float


def warmup_step(ni: int, nw: int, epoch_lr: tuple[float, ...], bias_group: int, warmup_bias_lr: float,
                warmup_momentum: float, momentum: float, total_batch_size: int,
                nbs: int = NOMINAL_BATCH) -> WarmupStep:
    """Values at iteration `ni` <= `nw` of warm-up.

    accumulate rises from 1 to nbs / total_batch_size; the bias group's lr falls from
    `warmup_bias_lr` to its epoch lr while the other groups rise from 0 to theirs (`epoch_lr` =
    lr0 * lf(epoch) per group); momentum rises from `warmup_momentum` to `momentum`.
    """
    xp = [0, nw]
    accumulate = max(1, int(np.interp(ni, xp, [1, nbs / total_batch_size]).round()))
    lrs = tuple(float(np.interp(ni, xp, [warmup_bias_lr if j == bias_group else 0.0, lr]))
                for j, lr in enumerate(epoch_lr))
    return WarmupStep(accumulate, lrs, float(np.interp(ni, xp, [warmup_momentum, momentum])))


def multiscale_size(rng: random.Random, imgsz: int, stride: int) -> int:
    """A random multiple of `stride` within [0.5, 1.5] * imgsz (both ends inclusive)."""
    lo = math.ceil(0.5 * imgsz / stride) * stride
    hi = max(lo, math.floor(1.5 * imgsz / stride) * stride)
    return rng.randrange(lo, hi + 1, stride)


def resize_batch(imgs: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Resize (B, 3, H, W) so its long side is `size`, each side a stride multiple (bilinear).
    Targets are normalised, so they need no change."""
    factor = size / max(imgs.shape[2:])
    if factor == 1:
        return imgs
    new_hw = [math.ceil(x * factor / stride) * stride for x in imgs.shape[2:]]
    return F.interpolate(imgs, size=new_hw, mode="bilinear", align_corners=False)
