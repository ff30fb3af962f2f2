"""The YOLOv5 loss: CIoU box, BCE objectness with IoU targets, BCE classes.

`assign_targets` (anchor matching) is a pure function so it can be tested on hand-built targets.
`YoloLoss(preds, targets)` returns `(loss * batch_size, parts)` where `parts` is the detached
`[box, obj, cls, total]` breakdown used for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.ops.boxes import paired_iou, xywh2xyxy

# Neighbour cells: the target's own cell plus the two nearest of left/up/right/down (v5 trick that
# triples positives; centre offsets are predicted in (-0.5, 1.5) so neighbours can reach it).
_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)


@dataclass(frozen=True)
class LossGains:
    """Loss hyperparameters, already scaled for the model (see `scale_loss_gains`)."""

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    cls_pw: float = 1.0
    obj_pw: float = 1.0
    anchor_t: float = 4.0
    fl_gamma: float = 0.0
    label_smoothing: float = 0.0
    balance: tuple[float, ...] = (4.0, 1.0, 0.4)  # objectness weight of P3, P4, P5


def scale_loss_gains(hyp: dict, nl: int, nc: int, imgsz: int) -> LossGains:
    """YOLOv5's gain scaling: the hyp values are tuned for 3 levels, 80 classes and 640 px."""
    balance = (4.0, 1.0, 0.4) if nl == 3 else (4.0, 1.0, 0.25, 0.06, 0.02)[:nl]
    return LossGains(
        box=hyp["box"] * 3 / nl,
        obj=hyp["obj"] * (imgsz / 640) ** 2 * 3 / nl,
        cls=hyp["cls"] * nc / 80 * 3 / nl,
        cls_pw=hyp.get("cls_pw", 1.0), obj_pw=hyp.get("obj_pw", 1.0),
        anchor_t=hyp.get("anchor_t", 4.0), fl_gamma=hyp.get("fl_gamma", 0.0),
        label_smoothing=hyp.get("label_smoothing", 0.0), balance=balance,
    )


@dataclass(frozen=True)
class LevelTargets:
    """Positives of one level, each row one (target, anchor, cell) match."""

    image: torch.Tensor     # (n,) batch index
    anchor: torch.Tensor    # (n,) anchor index in 0..na-1
    gj: torch.Tensor        # (n,) cell row
    gi: torch.Tensor        # (n,) cell column
    box: torch.Tensor       # (n, 4) [x - gi, y - gj, w, h] in grid units
    anchor_wh: torch.Tensor  # (n, 2) anchor size in grid units
    cls: torch.Tensor       # (n,) class id


def assign_targets(targets: torch.Tensor, anchors: torch.Tensor, grid_hw: list[tuple[int, int]],
                   anchor_t: float = 4.0) -> list[LevelTargets]:
    """Match targets to anchors and cells on every level.

    targets: (nt, 6) [image, cls, cx, cy, w, h], normalised to the input size.
    anchors: (nl, na, 2) in grid units of each level. grid_hw: (H, W) of each level.
    A target matches an anchor when both w and h ratios (either way) are below `anchor_t`; each
    match is assigned to its own cell and the two neighbouring cells nearest to its centre.
    """
    nl, na, _ = anchors.shape
    device = targets.device
    nt = targets.shape[0]
    anchor_idx = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).repeat(1, nt)
    # (na, nt, 7): every target once per anchor, with the anchor index appended
    t_all = torch.cat((targets.float().repeat(na, 1, 1), anchor_idx[..., None]), dim=2)
    offsets = _OFFSETS.to(device) * 0.5
    out = []
    for level in range(nl):
        h, w = grid_hw[level]
        scale = torch.tensor([1, 1, w, h, w, h, 1], device=device, dtype=torch.float32)
        t = t_all * scale  # boxes in grid units of this level
        if nt:
            ratio = t[..., 4:6] / anchors[level][:, None].to(device)
            t = t[torch.max(ratio, 1 / ratio).max(2).values < anchor_t]  # (m, 7)
            gxy = t[:, 2:4]
            gxy_inv = torch.tensor([w, h], device=device) - gxy
            left, up = ((gxy % 1 < 0.5) & (gxy > 1)).T
            right, down = ((gxy_inv % 1 < 0.5) & (gxy_inv > 1)).T
            use = torch.stack((torch.ones_like(left), left, up, right, down))  # (5, m)
            t = t.repeat(5, 1, 1)[use]
            off = (torch.zeros_like(gxy)[None] + offsets[:, None])[use]
        else:
            t = t_all[0, :0]
            off = torch.zeros(0, 2, device=device)
        gxy = t[:, 2:4]
        gij = (gxy - off).long()
        gi, gj = gij[:, 0].clamp(0, w - 1), gij[:, 1].clamp(0, h - 1)
        a = t[:, 6].long()
        out.append(LevelTargets(
            image=t[:, 0].long(), anchor=a, gj=gj, gi=gi,
            box=torch.cat((gxy - torch.stack((gi, gj), 1), t[:, 4:6]), 1),
            anchor_wh=anchors[level].to(device)[a], cls=t[:, 1].long(),
        ))
    return out


class FocalBCE(nn.Module):
    """Focal loss (Lin et al.) on top of BCE-with-logits, mean-reduced."""

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25):
        super().__init__()
        self.bce, self.gamma, self.alpha = bce, gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(
            logits, target, weight=self.bce.weight, pos_weight=self.bce.pos_weight, reduction="none")
        p = torch.sigmoid(logits)
        p_t = target * p + (1 - target) * (1 - p)
        alpha_t = target * self.alpha + (1 - target) * (1 - self.alpha)
        return (loss * alpha_t * (1.0 - p_t) ** self.gamma).mean()


class YoloLoss:
    """Callable loss; `anchors` (nl, na, 2) in grid units, as in `Detect.anchors`."""

    def __init__(self, anchors: torch.Tensor, nc: int, gains: LossGains, obj_iou_ratio: float = 1.0):
        self.anchors = anchors.detach()
        self.nc = nc
        self.gains = gains
        self.gr = obj_iou_ratio  # objectness target = (1 - gr) + gr * IoU
        device = anchors.device
        cls_bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([gains.cls_pw], device=device))
        obj_bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([gains.obj_pw], device=device))
        if gains.fl_gamma > 0:
            cls_bce, obj_bce = FocalBCE(cls_bce, gains.fl_gamma), FocalBCE(obj_bce, gains.fl_gamma)
        self.cls_bce, self.obj_bce = cls_bce, obj_bce
        # Smoothed class targets: positive 1 - eps/2, negative eps/2.
        self.cls_pos = 1.0 - 0.5 * gains.label_smoothing
        self.cls_neg = 0.5 * gains.label_smoothing

    def set_class_weights(self, weights: torch.Tensor | None) -> None:
        """Weight each class's BCE column by `weights` (nc,) (e.g. from maps; mean 1 keeps the loss
        scale), or None for equal weights. Multiplies both its positive and negative terms."""
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32, device=self.anchors.device).reshape(-1)
            if weights.shape != (self.nc,) or not torch.isfinite(weights).all() or (weights < 0).any():
                raise ValueError(f"class loss weights must be {self.nc} finite values >= 0")
        bce = self.cls_bce.bce if isinstance(self.cls_bce, FocalBCE) else self.cls_bce
        bce.weight = weights

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """preds: per level (B, na, H, W, 5 + nc) logits; targets: (nt, 6) normalised."""
        device = preds[0].device
        lbox = torch.zeros(1, device=device)
        lobj = torch.zeros(1, device=device)
        lcls = torch.zeros(1, device=device)
        assigned = assign_targets(targets.to(device), self.anchors.to(device),
                                  [(p.shape[2], p.shape[3]) for p in preds], self.gains.anchor_t)
        for level, (p, tg) in enumerate(zip(preds, assigned)):
            if p.dtype in (torch.float16, torch.bfloat16):
                p = p.float()  # loss maths in fp32 even under autocast
            tobj = torch.zeros(p.shape[:4], device=device, dtype=p.dtype)  # (B, na, H, W)
            n = tg.image.shape[0]
            if n:
                ps = p[tg.image, tg.anchor, tg.gj, tg.gi]  # (n, 5 + nc)
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * tg.anchor_wh
                iou = paired_iou(xywh2xyxy(torch.cat((pxy, pwh), 1)), xywh2xyxy(tg.box), kind="ciou")
                lbox = lbox + (1.0 - iou).mean()
                tobj[tg.image, tg.anchor, tg.gj, tg.gi] = (1.0 - self.gr) + self.gr * iou.detach().clamp(0)
                if self.nc > 1:  # a single class needs no class loss: objectness covers it
                    t = torch.full_like(ps[:, 5:], self.cls_neg)
                    t[torch.arange(n, device=device), tg.cls] = self.cls_pos
                    lcls = lcls + self.cls_bce(ps[:, 5:], t)
            lobj = lobj + self.obj_bce(p[..., 4], tobj) * self.gains.balance[level]
        lbox = lbox * self.gains.box
        lobj = lobj * self.gains.obj
        lcls = lcls * self.gains.cls
        total = lbox + lobj + lcls
        bs = preds[0].shape[0]
        return total * bs, torch.cat((lbox, lobj, lcls, total)).detach()
