"""NMS on hand-built decoded predictions: (B, N, 5 + nc) rows of [cx, cy, w, h, obj, cls probs...]."""

from __future__ import annotations

import pytest
import torch

from trainer.ops.nms import non_max_suppression


def _row(cx: float, cy: float, w: float, h: float, obj: float, cls: list[float]) -> list[float]:
    return [cx, cy, w, h, obj, *cls]


def _pred(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([list(rows)], dtype=torch.float32)  # (1, N, 5 + nc)


# Two 20x20 boxes offset by 2 px: IoU = 18*20 / (800 - 360) = 0.818 > 0.45.
A = (50.0, 50.0, 20.0, 20.0)
B = (52.0, 50.0, 20.0, 20.0)
FAR = (150.0, 150.0, 20.0, 20.0)


def test_overlapping_same_class_keeps_the_best() -> None:
    pred = _pred(_row(*A, 0.9, [0.9, 0.1]), _row(*B, 0.8, [0.9, 0.1]))
    (det,) = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45)
    assert det.shape == (1, 6)
    # xyxy of A, score = obj * cls = 0.81, class 0
    torch.testing.assert_close(det[0], torch.tensor([40.0, 40.0, 60.0, 60.0, 0.81, 0.0]))


def test_overlapping_low_iou_threshold_vs_high() -> None:
    pred = _pred(_row(*A, 0.9, [1.0]), _row(*B, 0.8, [1.0]))
    assert non_max_suppression(pred, iou_thres=0.9)[0].shape[0] == 2  # 0.818 < 0.9: both survive
    assert non_max_suppression(pred, iou_thres=0.8)[0].shape[0] == 1


def test_different_classes_kept_unless_agnostic() -> None:
    pred = _pred(_row(*A, 0.9, [0.9, 0.1]), _row(*B, 0.8, [0.1, 0.9]))
    (det,) = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45)
    assert sorted(det[:, 5].tolist()) == [0.0, 1.0]
    (det_agnostic,) = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45, agnostic=True)
    assert det_agnostic.shape == (1, 6)
    assert det_agnostic[0, 5].item() == 0.0 and det_agnostic[0, 4].item() == pytest.approx(0.81)


def test_conf_threshold_uses_obj_times_cls() -> None:
    pred = _pred(
        _row(*A, 0.9, [0.5]),    # score 0.45: kept at 0.4
        _row(*FAR, 0.6, [0.6]),  # obj passes 0.4 but score 0.36 does not
        _row(10, 10, 4, 4, 0.3, [1.0]),  # obj 0.3 below 0.4
    )
    (det,) = non_max_suppression(pred, conf_thres=0.4)
    assert det.shape == (1, 6)
    assert det[0, 4].item() == pytest.approx(0.45)
    assert non_max_suppression(pred, conf_thres=0.3)[0].shape[0] == 2  # 0.45 and 0.36


def test_multi_label_one_row_per_class_above_threshold() -> None:
    pred = _pred(_row(*A, 1.0, [0.7, 0.5, 0.1]))
    (det,) = non_max_suppression(pred, conf_thres=0.25, multi_label=True)
    assert det.shape == (2, 6)
    rows = sorted(det.tolist(), key=lambda r: r[5])
    assert [r[5] for r in rows] == [0.0, 1.0]
    assert [r[4] for r in rows] == pytest.approx([0.7, 0.5])
    for r in rows:
        assert r[:4] == pytest.approx([40.0, 40.0, 60.0, 60.0])
    (single,) = non_max_suppression(pred, conf_thres=0.25, multi_label=False)
    assert single.shape == (1, 6) and single[0, 5].item() == 0.0


def test_max_det_keeps_highest_scores() -> None:
    # Ten non-overlapping boxes with scores 0.50..0.95.
    rows = [_row(30.0 * i + 10, 10, 10, 10, 0.5 + 0.05 * i, [1.0]) for i in range(10)]
    (det,) = non_max_suppression(_pred(*rows), conf_thres=0.25, max_det=3)
    assert det.shape == (3, 6)
    assert det[:, 4].tolist() == pytest.approx([0.95, 0.90, 0.85])
    (all_det,) = non_max_suppression(_pred(*rows), conf_thres=0.25)
    assert all_det.shape == (10, 6)


def test_batch_images_are_independent() -> None:
    pred = torch.tensor([[_row(*A, 0.9, [1.0]), _row(*B, 0.8, [1.0])],
                         [_row(*A, 0.1, [1.0]), _row(*FAR, 0.7, [1.0])]])
    out = non_max_suppression(pred)
    assert [d.shape[0] for d in out] == [1, 1]
    assert out[1][0, :4].tolist() == pytest.approx([140.0, 140.0, 160.0, 160.0])


@pytest.mark.parametrize("shape", [(2, 0, 7), (3, 5, 7)])
def test_empty_results_are_0_by_6(shape: tuple[int, int, int]) -> None:
    pred = torch.zeros(shape)  # no rows, or rows with zero confidence
    out = non_max_suppression(pred, multi_label=True)
    assert len(out) == shape[0]
    for det in out:
        assert det.shape == (0, 6)
    for det in non_max_suppression(pred):
        assert det.shape == (0, 6)


@pytest.mark.parametrize("conf,iou", [(-0.1, 0.45), (1.5, 0.45), (0.25, -1.0), (0.25, 2.0)])
def test_invalid_thresholds_raise(conf: float, iou: float) -> None:
    with pytest.raises(ValueError, match="must be in"):
        non_max_suppression(torch.zeros(1, 1, 6), conf_thres=conf, iou_thres=iou)
