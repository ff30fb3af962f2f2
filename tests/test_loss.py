"""Target assignment and the YOLOv5 loss against hand-built targets and hand-computed values.

Grid coordinates are chosen as exact binary fractions (3.625, 2.375, ...) so float32 maths is exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.loss import FocalBCE, LossGains, YoloLoss, assign_targets, scale_loss_gains
from trainer.models.yolo import build_model

# One level, 3 anchors in grid units. A 2x2 target matches anchor 0 (ratio 1) and anchor 1 (ratio 2);
# anchor 2 (ratio 5) is rejected by anchor_t = 4.
ANCHORS_1 = torch.tensor([[[2.0, 2.0], [1.0, 1.0], [10.0, 10.0]]])
GRID_1 = [(4, 8)]  # (H, W): deliberately not square so x/y mix-ups show
# cx = 3.625 / 8, cy = 2.375 / 4, w = 2 / 8, h = 2 / 4 -> gx 3.625, gy 2.375, 2 x 2 grid units
TARGET = [0, 1, 3.625 / 8, 2.375 / 4, 2 / 8, 2 / 4]
# gx frac 0.625 >= 0.5 -> right neighbour (gi 4); gy frac 0.375 < 0.5 -> upper neighbour (gj 1).
# Boxes are relative to the cell they are assigned to: [gx - gi, gy - gj, w, h].
EXPECTED_CELLS = {(2, 3): (0.625, 0.375), (2, 4): (-0.375, 0.375), (1, 3): (0.625, 1.375)}


def _rows(lt) -> dict[tuple[int, int, int, int], list[float]]:
    return {(int(i), int(a), int(gj), int(gi)): b.tolist()
            for i, a, gj, gi, b in zip(lt.image, lt.anchor, lt.gj, lt.gi, lt.box)}


def test_assign_own_cell_two_neighbours_and_anchor_ratio() -> None:
    (lt,) = assign_targets(torch.tensor([TARGET]), ANCHORS_1, GRID_1, anchor_t=4.0)
    rows = _rows(lt)
    expected = {(0, a, gj, gi): [dx, dy, 2.0, 2.0]
                for a in (0, 1) for (gj, gi), (dx, dy) in EXPECTED_CELLS.items()}
    assert rows == expected
    assert len(lt.image) == 6  # no duplicates
    assert lt.cls.tolist() == [1] * 6
    for a, wh in zip(lt.anchor.tolist(), lt.anchor_wh.tolist()):
        assert wh == ANCHORS_1[0, a].tolist()


def test_anchor_ratio_threshold_is_strict() -> None:
    # Anchor 1 (1x1) vs the 2x2 target has ratio 2: rejected at anchor_t = 2, kept at 2.01.
    (lt,) = assign_targets(torch.tensor([TARGET]), ANCHORS_1, GRID_1, anchor_t=2.0)
    assert set(lt.anchor.tolist()) == {0}
    (lt,) = assign_targets(torch.tensor([TARGET]), ANCHORS_1, GRID_1, anchor_t=2.01)
    assert set(lt.anchor.tolist()) == {0, 1}
    # A ratio in either direction counts: a 0.5 x 2 target vs a 2 x 2 anchor has ratio 4 in w.
    thin = torch.tensor([[0, 0, 3.625 / 8, 2.375 / 4, 0.5 / 8, 2 / 4]])
    (lt,) = assign_targets(thin, ANCHORS_1[:, :1], GRID_1, anchor_t=4.0)
    assert lt.image.numel() == 0


def test_border_targets_get_no_outward_neighbour() -> None:
    # gx = 0.25 (frac < 0.5 but gx <= 1: no left), gy = 3.75 on H = 4 (H - gy = 0.25 <= 1: no down).
    t = torch.tensor([[1, 0, 0.25 / 8, 3.75 / 4, 2 / 8, 2 / 4]])
    (lt,) = assign_targets(t, ANCHORS_1[:, :1], GRID_1)
    assert _rows(lt) == {(1, 0, 3, 0): [0.25, 0.75, 2.0, 2.0]}
    # Just inside: gx = 1.25 > 1 -> left neighbour (gi 0) appears.
    t = torch.tensor([[0, 0, 1.25 / 8, 3.75 / 4, 2 / 8, 2 / 4]])
    (lt,) = assign_targets(t, ANCHORS_1[:, :1], GRID_1)
    assert _rows(lt) == {(0, 0, 3, 1): [0.25, 0.75, 2.0, 2.0], (0, 0, 3, 0): [1.25, 0.75, 2.0, 2.0]}


def test_three_levels_scale_to_each_grid() -> None:
    # 64 x 128 input; strides 8/16/32 -> grids (8, 16), (4, 8), (2, 4). Target 32 x 32 px.
    anchors = torch.tensor([[[4.0, 4.0]], [[2.0, 2.0]], [[8.0, 8.0]]])  # grid units per level
    grids = [(8, 16), (4, 8), (2, 4)]
    t = torch.tensor([[0, 2, 58 / 128, 20 / 64, 32 / 128, 32 / 64]])  # centre (58, 20) px
    lv0, lv1, lv2 = assign_targets(t, anchors, grids)
    # P3: gxy (7.25, 2.5), wh 4x4 ratio 1; x frac 0.25 -> left (gi 6); y frac 0.5 -> neither.
    assert _rows(lv0) == {(0, 0, 2, 7): [0.25, 0.5, 4.0, 4.0], (0, 0, 2, 6): [1.25, 0.5, 4.0, 4.0]}
    # P4: gxy (3.625, 1.25), wh 2x2 ratio 1; right (gi 4) and up (gj 0).
    assert _rows(lv1) == {(0, 0, 1, 3): [0.625, 0.25, 2.0, 2.0], (0, 0, 1, 4): [-0.375, 0.25, 2.0, 2.0],
                          (0, 0, 0, 3): [0.625, 1.25, 2.0, 2.0]}
    # P5: wh 1x1 vs anchor 8x8 -> ratio 8, rejected.
    assert lv2.image.numel() == 0


def test_no_targets_gives_empty_levels() -> None:
    out = assign_targets(torch.zeros(0, 6), ANCHORS_1.repeat(3, 1, 1), [(4, 8), (2, 4), (1, 2)])
    assert len(out) == 3
    for lt in out:
        assert lt.image.shape == (0,) and lt.box.shape == (0, 4) and lt.anchor_wh.shape == (0, 2)


# ----------------------------------------------------------------------------- loss


def _ciou_xywh(p: tuple[float, float, float, float], t: tuple[float, float, float, float]) -> float:
    """CIoU from the paper's definition, for centre/size boxes."""
    (px, py, pw, ph), (tx, ty, tw, th) = p, t
    p1, p2 = (px - pw / 2, py - ph / 2), (px + pw / 2, py + ph / 2)
    t1, t2 = (tx - tw / 2, ty - th / 2), (tx + tw / 2, ty + th / 2)
    iw = max(0.0, min(p2[0], t2[0]) - max(p1[0], t1[0]))
    ih = max(0.0, min(p2[1], t2[1]) - max(p1[1], t1[1]))
    inter = iw * ih
    iou = inter / (pw * ph + tw * th - inter)
    cw = max(p2[0], t2[0]) - min(p1[0], t1[0])
    ch = max(p2[1], t2[1]) - min(p1[1], t1[1])
    rho2 = (px - tx) ** 2 + (py - ty) ** 2
    v = 4 / math.pi ** 2 * (math.atan(tw / th) - math.atan(pw / ph)) ** 2
    alpha = v / (1 - iou + v) if v else 0.0
    return iou - rho2 / (cw ** 2 + ch ** 2) - alpha * v


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


NC = 3
OBJ_LOGIT = -1.0
CLS_LOGITS = [0.5, -0.5, 1.0]
GAINS = LossGains(box=0.05, obj=1.0, cls=0.5, balance=(4.0,))


def _preds(bs: int = 2, nc: int = NC) -> torch.Tensor:
    """(B, na, H, W, 5 + nc): zero box logits, obj -1, fixed class logits everywhere."""
    p = torch.zeros(bs, 3, *GRID_1[0], 5 + nc)
    p[..., 4] = OBJ_LOGIT
    p[..., 5:] = torch.tensor(CLS_LOGITS[:nc])
    return p


def _expected_parts(smoothing: float = 0.0) -> tuple[float, float, float]:
    # Zero logits: pxy = 2 * 0.5 - 0.5 = 0.5 and pwh = (2 * 0.5)^2 * anchor = anchor.
    cious = [_ciou_xywh((0.5, 0.5, *anchor), (dx, dy, 2.0, 2.0))
             for anchor in ((2.0, 2.0), (1.0, 1.0)) for dx, dy in EXPECTED_CELLS.values()]
    lbox = sum(1 - c for c in cious) / len(cious) * GAINS.box
    n_cells = 2 * 3 * 4 * 8
    # Objectness target is the clamped CIoU at the 6 positives, 0 elsewhere.
    obj_sum = sum(_bce(OBJ_LOGIT, max(c, 0.0)) for c in cious) + (n_cells - 6) * _bce(OBJ_LOGIT, 0.0)
    lobj = obj_sum / n_cells * GAINS.balance[0] * GAINS.obj
    pos, neg = 1 - smoothing / 2, smoothing / 2
    # Every positive is class 1 and has the same class logits, so the mean is over the 3 classes.
    lcls = sum(_bce(x, pos if c == 1 else neg) for c, x in enumerate(CLS_LOGITS)) / NC * GAINS.cls
    return lbox, lobj, lcls


def test_loss_matches_hand_computation() -> None:
    preds = [_preds()]
    loss, parts = YoloLoss(ANCHORS_1, NC, GAINS)(preds, torch.tensor([TARGET]))
    lbox, lobj, lcls = _expected_parts()
    total = lbox + lobj + lcls
    assert parts.tolist() == pytest.approx([lbox, lobj, lcls, total], rel=1e-5)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(total * 2, rel=1e-5)  # loss * batch size
    assert not parts.requires_grad


def test_negative_ciou_objectness_target_is_clamped_to_zero() -> None:
    # wh logits of -6 shrink the boxes to (2 * sigmoid(-6))^2 ~ 1e-5 anchors: IoU ~ 0 and the centre
    # distance term makes every CIoU negative, so every objectness target is 0 (not negative).
    preds = _preds()
    preds[..., 2:4] = -6.0
    _, parts = YoloLoss(ANCHORS_1, NC, GAINS)([preds], torch.tensor([TARGET]))
    scale = (2 / (1 + math.exp(6.0))) ** 2
    cious = [_ciou_xywh((0.5, 0.5, anchor[0] * scale, anchor[1] * scale), (dx, dy, 2.0, 2.0))
             for anchor in ((2.0, 2.0), (1.0, 1.0)) for dx, dy in EXPECTED_CELLS.values()]
    assert max(cious) < 0
    assert parts[0].item() == pytest.approx(sum(1 - c for c in cious) / 6 * GAINS.box, rel=1e-5)
    assert parts[1].item() == pytest.approx(_bce(OBJ_LOGIT, 0.0) * GAINS.balance[0] * GAINS.obj, rel=1e-6)


def test_label_smoothing_targets() -> None:
    gains = LossGains(box=GAINS.box, obj=GAINS.obj, cls=GAINS.cls, balance=GAINS.balance, label_smoothing=0.2)
    _, parts = YoloLoss(ANCHORS_1, NC, gains)([_preds()], torch.tensor([TARGET]))
    lbox, lobj, lcls = _expected_parts(smoothing=0.2)
    assert parts[2].item() == pytest.approx(lcls, rel=1e-5)
    assert parts[2].item() != pytest.approx(_expected_parts()[2], rel=1e-3)
    assert parts[0].item() == pytest.approx(lbox, rel=1e-5)


def test_no_targets_only_objectness() -> None:
    # Three levels, zero logits: BCE(0, 0) = log 2 everywhere, weighted by balance 4 + 1 + 0.4.
    anchors = ANCHORS_1.repeat(3, 1, 1)
    preds = [torch.zeros(2, 3, 8, 8, 5 + NC), torch.zeros(2, 3, 4, 4, 5 + NC), torch.zeros(2, 3, 2, 2, 5 + NC)]
    gains = LossGains(obj=0.7)
    loss, parts = YoloLoss(anchors, NC, gains)(preds, torch.zeros(0, 6))
    expected_obj = math.log(2) * (4.0 + 1.0 + 0.4) * 0.7
    assert parts.tolist() == pytest.approx([0.0, expected_obj, 0.0, expected_obj], rel=1e-6)
    assert loss.item() == pytest.approx(2 * expected_obj, rel=1e-6)


def test_single_class_has_no_class_loss() -> None:
    target = torch.tensor([[0, 0, *TARGET[2:]]])
    _, parts = YoloLoss(ANCHORS_1, 1, GAINS)([_preds(nc=1)], target)
    lbox, lobj, _ = _expected_parts()
    assert parts[2].item() == 0.0
    assert parts[0].item() == pytest.approx(lbox, rel=1e-5)
    assert parts[1].item() == pytest.approx(lobj, rel=1e-5)


def test_focal_bce_by_hand_and_reduces_easy_examples() -> None:
    bce = torch.nn.BCEWithLogitsLoss()
    focal = FocalBCE(torch.nn.BCEWithLogitsLoss(), gamma=1.5, alpha=0.25)
    logits = torch.tensor([3.0, -2.0])
    target = torch.tensor([1.0, 0.0])  # both confidently right: "easy" examples
    p = [1 / (1 + math.exp(-3.0)), 1 / (1 + math.exp(2.0))]
    expected = (_bce(3.0, 1) * 0.25 * (1 - p[0]) ** 1.5 + _bce(-2.0, 0) * 0.75 * p[1] ** 1.5) / 2
    assert focal(logits, target).item() == pytest.approx(expected, rel=1e-5)
    assert focal(logits, target).item() < 0.05 * bce(logits, target).item()
    # Through YoloLoss: turning focal loss on lowers the (mostly easy, negative) objectness loss.
    focal_gains = LossGains(box=GAINS.box, obj=GAINS.obj, cls=GAINS.cls, balance=GAINS.balance, fl_gamma=1.5)
    _, plain = YoloLoss(ANCHORS_1, NC, GAINS)([_preds()], torch.tensor([TARGET]))
    _, with_focal = YoloLoss(ANCHORS_1, NC, focal_gains)([_preds()], torch.tensor([TARGET]))
    assert with_focal[1] < plain[1] and with_focal[2] < plain[2]
    assert with_focal[0] == pytest.approx(plain[0].item())  # box loss is not a BCE


def test_scale_loss_gains() -> None:
    hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5, "anchor_t": 4.0, "fl_gamma": 0.0, "label_smoothing": 0.1}
    g = scale_loss_gains(hyp, nl=3, nc=80, imgsz=640)
    assert (g.box, g.obj, g.cls, g.label_smoothing) == pytest.approx((0.05, 1.0, 0.5, 0.1))
    assert g.balance == (4.0, 1.0, 0.4)
    g = scale_loss_gains(hyp, nl=3, nc=20, imgsz=320)
    assert (g.box, g.obj, g.cls) == pytest.approx((0.05, 0.25, 0.125))
    g = scale_loss_gains(hyp, nl=4, nc=80, imgsz=640)
    assert g.balance == (4.0, 1.0, 0.25, 0.06)
    assert (g.box, g.obj, g.cls) == pytest.approx((0.0375, 0.75, 0.375))


def test_real_model_loss_is_finite_with_gradients() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build_model("yolov5n", nc=2)
    hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5}
    loss_fn = YoloLoss(model.detect.anchors, model.nc, scale_loss_gains(hyp, 3, 2, 64))
    preds = model(torch.rand(2, 3, 64, 64))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 0, 0.25, 0.75, 0.1, 0.1]])
    loss, parts = loss_fn(preds, targets)
    assert torch.isfinite(loss).all() and torch.isfinite(parts).all()
    assert (parts[:3] > 0).all()
    loss.sum().backward()
    for name, p in model.detect.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert model.model[0].conv.weight.grad.abs().sum() > 0  # gradients reach the stem
