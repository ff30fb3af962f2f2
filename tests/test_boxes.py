"""Box formats and IoU variants against values computed by hand from the paper definitions.

GIoU (Rezatofighi et al. 2019): IoU - (C - U) / C, C the smallest enclosing box's area.
DIoU (Zheng et al. 2020): IoU - rho^2 / c^2, rho the centre distance, c the enclosing box diagonal.
CIoU: DIoU - alpha * v, v = 4 / pi^2 * (atan(w2/h2) - atan(w1/h1))^2, alpha = v / (1 - IoU + v).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.data.augment import letterbox
from trainer.ops.boxes import (box_iou, clip_boxes, paired_iou, scale_boxes_to_original, xywh2xyxy,
                               xywhn2xyxy, xyxy2xywh)


def _v(w1: float, h1: float, w2: float, h2: float) -> float:
    return 4 / math.pi ** 2 * (math.atan(w2 / h2) - math.atan(w1 / h1)) ** 2


def _ciou(iou: float, diou: float, v: float) -> float:
    return diou - v / (1 - iou + v) * v if v else diou


# (box1, box2, iou, giou, diou, ciou), every value worked out by hand.
CASES = {
    # Identical boxes: all variants are exactly 1.
    "identical": ((1, 2, 5, 4), (1, 2, 5, 4), 1.0, 1.0, 1.0, 1.0),
    # Two 2x2 squares offset by (1, 1): I = 1, U = 7, C = 9, rho^2 = 2, c^2 = 18, same aspect so v = 0.
    "offset_squares": ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7, 1 / 7 - 2 / 9, 1 / 7 - 2 / 18, 1 / 7 - 2 / 18),
    # Disjoint unit squares 1 apart: I = 0, U = 2, C = 3, rho^2 = 4, c^2 = 10.
    "disjoint": ((0, 0, 1, 1), (2, 0, 3, 1), 0.0, -1 / 3, -0.4, -0.4),
    # A 1x1 box inside a 4x4 box: I = 1, U = 16, C = 16, rho^2 = 0.5, c^2 = 32.
    "inside": ((0, 0, 4, 4), (1, 1, 2, 2), 1 / 16, 1 / 16, 1 / 16 - 0.5 / 32, 1 / 16 - 0.5 / 32),
    # 4x2 vs 2x4 crossing: I = 4, U = 12, C = 16, rho^2 = 1, c^2 = 32, aspect term non-zero.
    "crossing": ((0, 0, 4, 2), (1, 0, 3, 4), 1 / 3, 1 / 3 - 4 / 16, 1 / 3 - 1 / 32,
                 _ciou(1 / 3, 1 / 3 - 1 / 32, _v(4, 2, 2, 4))),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_paired_iou_matches_hand_values(name: str, kind: str) -> None:
    b1, b2, *values = CASES[name]
    expected = dict(zip(["iou", "giou", "diou", "ciou"], values))[kind]
    got = paired_iou(torch.tensor([b1], dtype=torch.float64), torch.tensor([b2], dtype=torch.float64), kind=kind)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_paired_iou_is_elementwise_and_symmetric() -> None:
    b1 = torch.tensor([c[0] for c in CASES.values()], dtype=torch.float64)
    b2 = torch.tensor([c[1] for c in CASES.values()], dtype=torch.float64)
    for idx, kind in enumerate(["iou", "giou", "diou", "ciou"]):
        expected = torch.tensor([c[2 + idx] for c in CASES.values()], dtype=torch.float64)
        torch.testing.assert_close(paired_iou(b1, b2, kind), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(paired_iou(b2, b1, kind), expected, atol=1e-6, rtol=0)


def test_crossing_ciou_is_below_diou() -> None:
    # Sanity on the hand formula itself: different aspect ratios must be penalised.
    v = _v(4, 2, 2, 4)
    assert v == pytest.approx(4 / math.pi ** 2 * (math.atan(2) - math.atan(0.5)) ** 2)
    assert CASES["crossing"][5] < CASES["crossing"][4]


def test_paired_iou_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown IoU kind 'siou'"):
        paired_iou(torch.zeros(1, 4), torch.zeros(1, 4), kind="siou")


def test_paired_iou_empty() -> None:
    for kind in ("iou", "giou", "diou", "ciou"):
        assert paired_iou(torch.zeros(0, 4), torch.zeros(0, 4), kind).shape == (0,)


def test_box_iou_pairwise_matrix() -> None:
    a = torch.tensor([[0, 0, 2, 2], [0, 0, 4, 4]], dtype=torch.float64)
    b = torch.tensor([[1, 1, 3, 3], [1, 1, 2, 2], [10, 10, 11, 11]], dtype=torch.float64)
    expected = torch.tensor([
        [1 / 7, 1 / 4, 0.0],   # (0,0,2,2) contains (1,1,2,2): I = 1, U = 4
        [4 / 16, 1 / 16, 0.0],  # (0,0,4,4) contains (1,1,3,3): I = 4, U = 16
    ], dtype=torch.float64)
    torch.testing.assert_close(box_iou(a, b), expected)
    assert box_iou(a, torch.zeros(0, 4, dtype=torch.float64)).shape == (2, 0)


def test_format_conversions_by_hand_and_round_trip() -> None:
    xywh = torch.tensor([[10.0, 20.0, 4.0, 6.0], [0.5, 0.5, 1.0, 1.0]])
    xyxy = torch.tensor([[8.0, 17.0, 12.0, 23.0], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(xywh2xyxy(xywh), xyxy)
    torch.testing.assert_close(xyxy2xywh(xyxy), xywh)
    torch.testing.assert_close(xyxy2xywh(xywh2xyxy(xywh)), xywh)
    # Inputs are not modified, and numpy arrays work the same way.
    assert xywh[0, 0].item() == 10.0
    np.testing.assert_allclose(xywh2xyxy(xywh.numpy()), xyxy.numpy())
    np.testing.assert_allclose(xyxy2xywh(xyxy.numpy()), xywh.numpy())
    # Batched (..., 4) shapes keep their leading dims.
    assert xywh2xyxy(torch.zeros(2, 3, 4)).shape == (2, 3, 4)


def test_xywhn2xyxy_with_padding() -> None:
    boxes = np.array([[0.5, 0.25, 0.5, 0.1]])
    # w=200, h=100, pad (3, 7): x 0.25..0.75 -> 50..150 (+3), y 0.2..0.3 -> 20..30 (+7)
    np.testing.assert_allclose(xywhn2xyxy(boxes, 200, 100, padw=3, padh=7), [[53, 27, 153, 37]])


def test_clip_boxes_torch_and_numpy_in_place() -> None:
    t = torch.tensor([[-5.0, -1.0, 50.0, 30.0], [10.0, 5.0, 20.0, 15.0]])
    out = clip_boxes(t, (20, 40))  # (h, w)
    assert out is t
    torch.testing.assert_close(t, torch.tensor([[0.0, 0.0, 40.0, 20.0], [10.0, 5.0, 20.0, 15.0]]))
    a = np.array([[-5.0, -1.0, 50.0, 30.0]])
    clip_boxes(a, (20, 40))
    np.testing.assert_allclose(a, [[0, 0, 40, 20]])


@pytest.mark.parametrize("hw,new_shape,scale_fill", [
    ((101, 203), 64, False),   # landscape: top/bottom padding, rw != rh after rounding
    ((90, 47), (64, 96), False),  # portrait into a wide canvas: left/right padding
    ((100, 200), 64, True),    # stretched: rw = 0.32, rh = 0.64, so swapping them would fail
])
def test_scale_boxes_to_original_undoes_letterbox(hw: tuple[int, int], new_shape, scale_fill: bool) -> None:
    h0, w0 = hw
    img = np.zeros((h0, w0, 3), dtype=np.uint8)
    out, (rw, rh), (padw, padh) = letterbox(img, new_shape, scale_fill=scale_fill)
    if not scale_fill:
        assert (padw, padh) != (0.0, 0.0)
    original = torch.tensor([[5.0, 7.0, 40.0, 60.0], [0.0, 0.0, w0, h0]], dtype=torch.float64)
    # Forward-map to the network input with the same ratios and padding, then undo.
    net = original.clone()
    net[:, [0, 2]] = net[:, [0, 2]] * rw + padw
    net[:, [1, 3]] = net[:, [1, 3]] * rh + padh
    assert net[1, 2] <= out.shape[1] + 1e-6 and net[1, 3] <= out.shape[0] + 1e-6
    back = scale_boxes_to_original(net, ((rh, rw), (padw, padh)), (h0, w0))
    torch.testing.assert_close(back, original)


def test_scale_boxes_to_original_clips_to_image() -> None:
    # A box reaching into the grey padding comes back clipped to the original image.
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    back = scale_boxes_to_original(boxes, ((0.5, 0.5), (0.0, 16.0)), (64, 128))
    torch.testing.assert_close(back, torch.tensor([[0.0, 0.0, 128.0, 64.0]]))


def test_ciou_of_a_collapsed_prediction_is_finite_with_gradients():
    """A predicted height that underflowed to 0 must not turn the loss into NaN."""
    pred = torch.tensor([[1.0, 1.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 1.0, 3.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    for kind in ("giou", "diou", "ciou"):
        value = paired_iou(pred, target, kind)
        assert torch.isfinite(value).all(), kind
        value.sum().backward()
        assert torch.isfinite(pred.grad).all(), kind
        pred.grad = None
