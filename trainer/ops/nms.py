"""Non-maximum suppression over decoded YOLO outputs, via torchvision.ops.batched_nms."""

from __future__ import annotations

import torch
from torchvision import ops

from trainer.ops.boxes import xywh2xyxy


def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        multi_label: bool = False, agnostic: bool = False, max_det: int = 300,
                        max_nms: int = 30000) -> list[torch.Tensor]:
    """(B, N, 5 + nc) decoded predictions -> per image (n, 6) [x1, y1, x2, y2, conf, cls].

    Score = objectness x class probability. With `multi_label`, a box is kept once per class whose
    score passes `conf_thres` (used for mAP, where recall at low confidence matters).
    """
    if not (0 <= conf_thres <= 1 and 0 <= iou_thres <= 1):
        raise ValueError(f"conf_thres and iou_thres must be in [0, 1], got {conf_thres}, {iou_thres}")
    out = []
    for x in pred.float():  # (N, 5 + nc)
        x = x[x[:, 4] > conf_thres]  # objectness alone already bounds the final score
        scores = x[:, 5:] * x[:, 4:5]  # (n, nc)
        boxes = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((boxes[i], scores[i, j, None], j[:, None].float()), dim=1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat((boxes, conf, j.float()), dim=1)[conf.view(-1) > conf_thres]
        if det.shape[0] > max_nms:  # bound NMS cost on untrained models that fire everywhere
            det = det[det[:, 4].topk(max_nms).indices]
        groups = torch.zeros_like(det[:, 5]) if agnostic else det[:, 5]
        keep = ops.batched_nms(det[:, :4], det[:, 4], groups, iou_thres)[:max_det]
        out.append(det[keep])
    return out
