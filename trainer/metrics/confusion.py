"""Detection confusion matrix (YOLOv5 convention).

``matrix[i, j]`` counts detections of predicted class i paired with a label of true class j.
Index nc is background: row nc holds labels nothing detected (missed), column nc holds
detections that match no label (false alarms). Matching ignores classes, so a detection of
the wrong class on a labelled object lands off the diagonal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou


def _as_tensor(x: Any, cols: int, what: str) -> torch.Tensor:
    """(N, cols) float64 CPU tensor; empty input becomes (0, cols)."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.numel() == 0:
        return t.new_zeros((0, cols))
    if t.ndim != 2 or t.shape[1] != cols:
        raise ValueError(f"{what} must have shape (N, {cols}), got {tuple(t.shape)}")
    return t


class ConfusionMatrix:
    """Counts (predicted class, true class) pairs over images; see the module docstring."""

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), np.int64)  # rows predicted, columns true

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix[:] = 0

    def update(self, preds: Any, gts: Any) -> None:
        """Add one image: preds (N, 6) [x1, y1, x2, y2, conf, cls], gts (M, 5) [cls, x1..y2].

        Detections with conf >= self.conf are paired with labels greedily, highest IoU first,
        over pairs with IoU > iou_thres; each detection and label is used at most once.
        """
        p = _as_tensor(preds, 6, "preds")
        g = _as_tensor(gts, 5, "gts")
        p = p[p[:, 4] >= self.conf]
        det_cls = p[:, 5].long().numpy()
        gt_cls = g[:, 0].long().numpy()
        for cls, what in ((det_cls, "preds"), (gt_cls, "gts")):
            if ((cls < 0) | (cls >= self.nc)).any():
                raise ValueError(f"{what}: class outside [0, {self.nc})")
        gi, di = self._match(g[:, 1:5], p[:, :4])
        bg = self.nc
        np.add.at(self.matrix, (det_cls[di], gt_cls[gi]), 1)
        missed = np.setdiff1d(np.arange(len(gt_cls)), gi)
        np.add.at(self.matrix, (np.full(len(missed), bg), gt_cls[missed]), 1)
        extra = np.setdiff1d(np.arange(len(det_cls)), di)
        np.add.at(self.matrix, (det_cls[extra], np.full(len(extra), bg)), 1)

    def _match(self, gt_boxes: torch.Tensor, det_boxes: torch.Tensor):
        """Greedy one-to-one pairs, highest IoU first: (gt indices, det indices) int arrays."""
        if len(gt_boxes) == 0 or len(det_boxes) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        iou = box_iou(gt_boxes, det_boxes)  # (M, N)
        gi, di = torch.nonzero(iou > self.iou_thres, as_tuple=True)
        # stable: equal IoUs keep (label, detection) row-major order
        order = torch.argsort(iou[gi, di], descending=True, stable=True)
        used_g, used_d, pairs = set(), set(), []
        for g, d in zip(gi[order].tolist(), di[order].tolist()):
            if g not in used_g and d not in used_d:
                used_g.add(g)
                used_d.add(d)
                pairs.append((g, d))
        out = np.asarray(pairs, np.int64).reshape(-1, 2)
        return out[:, 0], out[:, 1]
