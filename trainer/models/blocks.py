"""YOLOv5 v6/v7 building blocks.

Attribute names (`conv`, `bn`, `cv1`, `m`, ...) are part of the contract: they make the state_dict
keys identical to the official ultralytics checkpoints, so those weights load by key.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def same_padding(k: int, d: int = 1) -> int:
    """Padding that keeps the spatial size for stride 1 (odd kernels)."""
    return (d * (k - 1) + 1) // 2


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None,
                 g: int = 1, d: int = 1, act: bool = True):
        super().__init__()
        pad = same_padding(k, d) if p is None else p
        self.conv = nn.Conv2d(c1, c2, k, s, pad, groups=g, dilation=d, bias=False)
        # YOLOv5 trains with BN eps 1e-3 and momentum 0.03 (EMA-like, slower than torch's 0.1).
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.dtype == torch.bfloat16:
            # Under bf16 autocast the convolution runs in bf16; BatchNorm, SiLU and what follows up
            # to the next conv (residual adds, concats) run in fp32, and the next conv casts back.
            # BN fed bf16 directly (torch's CPU kernel then sums in fp32 but writes bf16) gave the
            # same gradient agreement with fp64 (cosine 0.9955 against 0.9959 from the official
            # weights, 0.62 against 0.64 from scratch; 3 batches each, 2 fresh inits) and no
            # measurable gain in whole training epochs, so the fp32 path stays.
            with torch.autocast(y.device.type, enabled=False):
                return self.act(self.bn(y.float()))
        return self.act(self.bn(y))


class Bottleneck(nn.Module):
    """1x1 then 3x3 Conv, with a residual add when shapes allow and `shortcut` is on."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: two 1x1 branches, `n` Bottlenecks on one, joined by a 1x1."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained k x k max-pools equal SPP's 5/9/13 pools."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), dim=1))


class Concat(nn.Module):
    """Concatenate a list of tensors along `dimension`."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, dim=self.d)


class Detect(nn.Module):
    """Per-level 1x1 convs predicting `na` anchors x (4 box + 1 obj + nc classes).

    `forward` returns raw logits per level, shaped (B, na, H, W, 5 + nc); `decode` turns them
    into boxes in input pixels. `anchors` is a buffer in grid units of each level (pixels / stride),
    as in the official checkpoints; `stride` is set by the model once it has probed the levels.
    """

    def __init__(self, nc: int, anchors: list[list[float]], ch: list[int]):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        # Not persistent: the official state_dict has no stride key; the model recomputes it.
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        self._grids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, x in enumerate(xs):
            b, _, h, w = x.shape
            y = self.m[i](x)
            if y.dim() == 4 and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last):
                # Already (B, H, W, na*no) in memory: (B, na, H, W, no) is a strided view of it, and
                # making it contiguous would cost a copy forward and another backward (9 % of a
                # channels_last training step at 320 px, bench/bench_train_step.py).
                out.append(y.permute(0, 2, 3, 1).view(b, h, w, self.na, self.no).permute(0, 3, 1, 2, 4))
            else:  # (B, na*no, H, W) -> (B, na, H, W, no)
                out.append(y.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw level outputs -> (B, sum(na*H*W), 5 + nc): xywh in pixels, sigmoid obj and cls."""
        boxes = []
        for i, p in enumerate(raw):
            b, na, h, w, no = p.shape
            y = p.float().sigmoid()
            grid, anchor_px = self._grid(i, h, w, y.device)
            # v6/v7 parametrisation: centre offset in (-0.5, 1.5) cells, size in (0, 4) anchors.
            xy = (y[..., :2] * 2 + grid) * self.stride[i]
            wh = (y[..., 2:4] * 2) ** 2 * anchor_px
            boxes.append(torch.cat((xy, wh, y[..., 4:]), dim=-1).view(b, -1, no))
        return torch.cat(boxes, dim=1)

    def _grid(self, i: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell offsets minus 0.5, (1, 1, h, w, 2), and anchor sizes in pixels, (1, na, 1, 1, 2), of
        level i; kept per (level, size, device) and the buffers' versions (an in-place change to the
        stride or the anchors, a state_dict load included, bumps them), with no device sync per call."""
        key = (i, h, w, str(device), self.stride.data_ptr(), self.stride._version, self.anchors.data_ptr(),
               self.anchors._version)  # data_ptr: a deepcopy's buffers are other tensors, fresh versions
        cached = self._grids.get(key)
        if cached is None:
            gy, gx = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                    torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
            grid = torch.stack((gx, gy), dim=-1).view(1, 1, h, w, 2) - 0.5
            anchor_px = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).float()
            cached = self._grids[key] = (grid, anchor_px)
        return cached

    @torch.no_grad()
    def initialise_biases(self, class_freq: torch.Tensor | None = None, image_size: int = 640) -> None:
        """Start objectness at ~8 objects per 640px image and class scores at ~0.6/nc (or priors)."""
        for conv, s in zip(self.m, self.stride.tolist()):
            b = conv.bias.view(self.na, -1)
            b[:, 4] += math.log(8 / (image_size / s) ** 2)
            if class_freq is None:
                b[:, 5:] += math.log(0.6 / (self.nc - 0.99999))
            else:
                b[:, 5:] += torch.log(class_freq / class_freq.sum())
