"""Box formats and IoU variants. Pairwise IoU and the GIoU/DIoU/CIoU maths come from torchvision.ops.

Formats: `xyxy` = corners, `xywh` = centre and size; `n` suffix = normalised by image width/height.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import ops

Array = torch.Tensor | np.ndarray


def _clone(x: Array) -> Array:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xywh2xyxy(x: Array) -> Array:
    """(..., 4) centre/size -> corners."""
    y = _clone(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x: Array) -> Array:
    """(..., 4) corners -> centre/size."""
    y = _clone(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x: Array, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> Array:
    """Normalised centre/size -> pixel corners on a (possibly padded) image."""
    y = xywh2xyxy(x)
    y[..., [0, 2]] = y[..., [0, 2]] * w + padw
    y[..., [1, 3]] = y[..., [1, 3]] * h + padh
    return y


def clip_boxes(boxes: Array, shape_hw: tuple[int, int]) -> Array:
    """Clip xyxy boxes in place to an image of shape (h, w)."""
    h, w = shape_hw
    if isinstance(boxes, torch.Tensor):
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clamp(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clamp(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes_to_original(boxes: torch.Tensor, ratio_pad: tuple, original_hw: tuple[int, int]) -> torch.Tensor:
    """Undo letterbox: xyxy on the network input -> xyxy on the original image (in place).

    `ratio_pad` is the dataset's `((rh, rw), (padw, padh))`: resize ratios and left/top padding.
    """
    (rh, rw), (padw, padh) = ratio_pad
    boxes[..., [0, 2]] = (boxes[..., [0, 2]] - padw) / rw
    boxes[..., [1, 3]] = (boxes[..., [1, 3]] - padh) / rh
    return clip_boxes(boxes, original_hw)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    return ops.box_iou(boxes1, boxes2)


def paired_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, kind: str = "iou", eps: float = 1e-7) -> torch.Tensor:
    """IoU of corresponding xyxy boxes: (N, 4), (N, 4) -> (N,). `kind`: iou, giou, diou or ciou.

    GIoU/DIoU/CIoU are `1 - loss` of torchvision's matching losses (CIoU's aspect term uses a
    no-grad alpha, as in the CIoU paper and YOLOv5).
    """
    if kind == "iou":
        lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
        rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(1)
        area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(1)
        return inter / (area1 + area2 - inter + eps)
    losses = {"giou": ops.generalized_box_iou_loss, "diou": ops.distance_box_iou_loss,
              "ciou": ops.complete_box_iou_loss}
    if kind not in losses:
        raise ValueError(f"unknown IoU kind {kind!r}; expected iou, giou, diou or ciou")
    # CIoU's aspect term divides w by h: a predicted size that underflowed to 0 would give NaN.
    # Give every box a size of at least eps (a no-op for real boxes, gradients intact).
    boxes1, boxes2 = _min_size(boxes1, eps), _min_size(boxes2, eps)
    return 1.0 - losses[kind](boxes1, boxes2, reduction="none", eps=eps)


def _min_size(boxes: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.cat((boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + eps)), dim=1)
