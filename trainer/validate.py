"""Validation pass: model -> NMS -> boxes on the original images -> COCO-exact metrics.

Used after every training epoch and by `python -m trainer.evaluate`. Predictions and labels are
mapped back to original image pixels first, so COCO's small/medium/large areas mean what they do
for any other COCO tool reading the same images.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from trainer.amp import Precision
from trainer.ema import unwrap
from trainer.loss import YoloLoss
from trainer.metrics.detection import DetectionMetrics
from trainer.ops.boxes import scale_boxes_to_original, xywhn2xyxy
from trainer.ops.nms import non_max_suppression

# Callback for plots/exports: (batch index, images (B,3,H,W) in [0,1], targets (N,6), per-image
# detections on the network input (n,6), paths, shapes)
BatchHook = Callable[[int, torch.Tensor, torch.Tensor, list[torch.Tensor], Sequence[str], Sequence[Any]], None]
# Callback per image, in original pixels: (path, preds (n, 6) [x1, y1, x2, y2, conf, cls],
# labels (m, 5) [cls, x1, y1, x2, y2], original (h, w) or None)
ImageHook = Callable[[str, np.ndarray, np.ndarray, tuple[int, int] | None], None]


def originals(dets: torch.Tensor, labels: torch.Tensor, input_hw: tuple[int, int], shape: Any) -> tuple[np.ndarray, np.ndarray]:
    """Detections (n, 6) xyxy and labels (m, 6) [img, cls, cx, cy, w, h] normalised to the network
    input -> ((n, 6) [x1, y1, x2, y2, conf, cls], (m, 5) [cls, x1, y1, x2, y2]) on the original image."""
    h, w = input_hw
    gt_boxes = xywhn2xyxy(labels[:, 2:6].float(), w, h)
    det = dets.clone()
    if shape is not None:
        original_hw, ratio_pad = shape
        scale_boxes_to_original(det[:, :4], ratio_pad, original_hw)
        scale_boxes_to_original(gt_boxes, ratio_pad, original_hw)
    gts = torch.cat((labels[:, 1:2].float(), gt_boxes), dim=1)
    return det.cpu().numpy(), gts.cpu().numpy()


@torch.no_grad()
def run_validation(model: torch.nn.Module, loader: Iterable, device: torch.device, names: Sequence[str],
                   precision: Precision, loss_fn: YoloLoss | None = None, conf_thres: float = 0.001,
                   iou_thres: float = 0.6, max_det: int = 300, on_batch: BatchHook | None = None,
                   on_image: ImageHook | None = None, metrics: DetectionMetrics | None = None) -> dict[str, Any]:
    """Evaluate `model` over `loader`; returns DetectionMetrics.compute() plus mean val losses.

    Pass `metrics` to keep the accumulated state (e.g. to merge shards across ranks yourself).
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    metrics = metrics if metrics is not None else DetectionMetrics(len(names), names)
    losses = torch.zeros(3)
    n_batches = 0
    for bi, (imgs, targets, paths, shapes) in enumerate(loader):
        imgs = imgs.to(device, non_blocking=True).float() / 255
        with precision.autocast():
            raw = net(imgs)
        raw = [r.float() for r in raw]
        if loss_fn is not None:
            losses += loss_fn(raw, targets.to(device))[1][:3].cpu()
        dets = non_max_suppression(net.detect.decode(raw), conf_thres, iou_thres, multi_label=True, max_det=max_det)
        for si, det in enumerate(dets):
            shape = shapes[si] if shapes is not None else None
            p, g = originals(det, targets[targets[:, 0] == si].to(device), tuple(imgs.shape[2:]), shape)
            metrics.update(p, g)
            if on_image is not None:
                on_image(paths[si], p, g, tuple(shape[0]) if shape is not None else None)
        if on_batch is not None:
            on_batch(bi, imgs, targets, dets, paths, shapes)
        n_batches += 1
    net.train(was_training)
    result = metrics.compute()
    mean_losses = (losses / max(n_batches, 1)).tolist()
    result.update(val_box=mean_losses[0], val_obj=mean_losses[1], val_cls=mean_losses[2])
    return result
