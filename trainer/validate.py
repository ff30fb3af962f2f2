"""Validation pass: model -> NMS -> boxes on the original images -> COCO-exact metrics.

Used after training epochs and by `python -m trainer.evaluate`. Under DDP the pass is sharded:
each rank runs whole batches of the same batching one process would use, and rank 0 merges the
detections in dataset order, so the COCO figures equal a single-process pass. Predictions and labels are
mapped back to original image pixels first, so COCO's small/medium/large areas mean what they do
for any other COCO tool reading the same images.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from trainer import distributed
from trainer.amp import Precision
from trainer.ema import unwrap
from trainer.loss import YoloLoss
from trainer.metrics.detection import DetectionMetrics
from trainer.models.yolo import YoloModel
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
def accumulate(model: torch.nn.Module, loader: Iterable, device: torch.device, metrics: DetectionMetrics,
               precision: Precision, loss_fn: YoloLoss | None = None, conf_thres: float = 0.001,
               iou_thres: float = 0.6, max_det: int = 300, on_batch: BatchHook | None = None,
               on_image: ImageHook | None = None) -> tuple[torch.Tensor, int]:
    """Run `model` over `loader`, adding every image to `metrics` in loader order; returns the
    summed val losses (3,) [box, obj, cls] and the number of batches. A YoloModel runs as its fused
    copy (BatchNorm folded into the convolutions); `model` itself is left as it was."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    owner, net = net, (net.fused() if isinstance(net, YoloModel) else net)
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
    owner.train(was_training)
    return losses, n_batches


def with_mean_losses(result: dict[str, Any], losses: torch.Tensor, n_batches: int) -> dict[str, Any]:
    mean = (losses / max(n_batches, 1)).tolist()
    result.update(val_box=mean[0], val_obj=mean[1], val_cls=mean[2])
    return result


def run_validation(model: torch.nn.Module, loader: Iterable, device: torch.device, names: Sequence[str],
                   precision: Precision, loss_fn: YoloLoss | None = None, conf_thres: float = 0.001,
                   iou_thres: float = 0.6, max_det: int = 300, on_batch: BatchHook | None = None,
                   on_image: ImageHook | None = None, metrics: DetectionMetrics | None = None) -> dict[str, Any]:
    """Evaluate `model` over `loader` in this process; returns DetectionMetrics.compute() plus mean
    val losses. Pass `metrics` to keep the accumulated state."""
    metrics = metrics if metrics is not None else DetectionMetrics(len(names), names)
    losses, n_batches = accumulate(model, loader, device, metrics, precision, loss_fn, conf_thres, iou_thres,
                                   max_det, on_batch, on_image)
    return with_mean_losses(metrics.compute(), losses, n_batches)


class ShardedBatches(Sampler[list[int]]):
    """Rank r of w takes batches r, r + w, r + 2w, ... of the sequential batching of n images, so
    every image sees exactly the batch (and rect shape) it would in one process."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad shard: batch {batch_size}, rank {rank} of {world_size}")
        starts = range(0, n, batch_size)
        self.batches = [list(range(s, min(s + batch_size, n))) for s in starts][rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def positions(self) -> list[int]:
        """Dataset positions of this shard's images, in the order the loader yields them."""
        return [i for b in self.batches for i in b]


def run_sharded_validation(model: torch.nn.Module, loader: DataLoader, device: torch.device, names: Sequence[str],
                           precision: Precision, loss_fn: YoloLoss | None = None,
                           is_main: bool = True) -> dict[str, Any]:
    """Validation split over the ranks: each runs its `ShardedBatches` of `loader`, rank 0 gathers
    every image's detections, puts them back in dataset order and computes COCO-exact metrics, so
    the figures equal a single-process pass. Every rank returns rank 0's result."""
    shard = loader.batch_sampler
    if not isinstance(shard, ShardedBatches):
        raise TypeError("run_sharded_validation needs a loader whose batch_sampler is ShardedBatches")
    mine = DetectionMetrics(len(names), names)
    losses, n_batches = accumulate(model, loader, device, mine, precision, loss_fn)
    part = (shard.positions(), mine.state(), losses, n_batches)
    parts = distributed.gather_objects(part)
    result: dict[str, Any] = {}
    if is_main:
        order, preds, gts = [], [], []
        for positions, state, _, _ in parts:
            order += positions
            preds += state["preds"]
            gts += state["gts"]
        merged = DetectionMetrics(len(names), names)
        ranked = np.argsort(np.asarray(order, np.int64), kind="stable")
        merged.merge([{"nc": len(names), "preds": [preds[k] for k in ranked], "gts": [gts[k] for k in ranked]}])
        total = sum((p[2] for p in parts), torch.zeros(3))
        result = with_mean_losses(merged.compute(), total, sum(p[3] for p in parts))
    return distributed.broadcast_object(result)
