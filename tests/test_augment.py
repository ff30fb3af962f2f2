"""Augmentation maths against hand-computed values."""

import numpy as np
import pytest

from trainer.data import augment as A


class HighRng:
    """A stand-in Generator whose uniform(lo, hi) always returns hi: makes draws predictable."""

    def uniform(self, lo, hi, size=None):
        return np.broadcast_to(np.asarray(hi, float), size).copy() if size is not None else float(hi)


def _canvas(h, w, fill=0):
    return np.full((h, w, 3), fill, np.uint8)


# ---------------------------------------------------------------- letterbox


def test_letterbox_even_padding():
    img = _canvas(100, 200, 50)
    out, ratio, pad = A.letterbox(img, 64)
    assert out.shape == (64, 64, 3)
    assert ratio == (0.32, 0.32) and pad == (0.0, 16.0)
    assert (out[:16] == 114).all() and (out[48:] == 114).all() and (out[16:48] == 50).all()


def test_letterbox_odd_padding_puts_extra_pixel_bottom():
    img = _canvas(30, 64, 7)
    out, ratio, pad = A.letterbox(img, (63, 64))
    # dh = 33: top = round(16.5 - 0.1) = 16, bottom = round(16.5 + 0.1) = 17
    assert out.shape == (63, 64, 3) and ratio == (1.0, 1.0) and pad == (0.0, 16.0)
    assert (out[:16] == 114).all() and (out[16:46] == 7).all() and (out[46:] == 114).all()


def test_letterbox_auto_and_scaleup_and_scale_fill():
    out, _, pad = A.letterbox(_canvas(30, 64), 64, auto=True, stride=32)
    assert out.shape == (32, 64, 3) and pad == (0.0, 1.0)  # 34 % 32 = 2 rows, 1 each side
    out, ratio, pad = A.letterbox(_canvas(20, 10), 64, scaleup=False)
    assert out.shape == (64, 64, 3) and ratio == (1.0, 1.0) and pad == (27.0, 22.0)
    out, ratio, pad = A.letterbox(_canvas(20, 10), (40, 30), scale_fill=True)
    assert out.shape == (40, 30, 3) and ratio == (3.0, 2.0) and pad == (0.0, 0.0)


def test_letterbox_no_op_keeps_image():
    img = _canvas(64, 64, 3)
    out, ratio, pad = A.letterbox(img, 64)
    assert out is img and ratio == (1.0, 1.0) and pad == (0.0, 0.0)


# ---------------------------------------------------------------- perspective


def test_identity_perspective_keeps_image_and_boxes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    t = np.array([[1, 5, 6, 30, 20], [0, 0, 0, 60, 40]], np.float32)
    out, t2 = A.random_perspective(img.copy(), t, rng=rng)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(t2, t)


def test_pure_translation_moves_image_and_boxes():
    img = _canvas(100, 200)
    img[20:40, 50:90] = 255
    t = np.array([[3, 50, 20, 90, 40]], np.float32)
    out, t2 = A.random_perspective(img, t, translate=0.1, rng=HighRng())
    # HighRng puts the centre at 0.6 of the output: shift = 0.1 * (200, 100) = (20, 10)
    np.testing.assert_allclose(t2, [[3, 70, 30, 110, 50]], atol=1e-4)
    assert (out[30:50, 70:110] == 255).all() and out[29, 70:110].max() < 255 and (out[:10] == 114).all()


def test_rotation_90_degrees():
    p = A.PerspectiveParams(angle=90)
    M = A.perspective_matrix(p, (100, 100), (100, 100))
    # Counter-clockwise on screen about the centre: (x, y) → (y, 100 - x).
    np.testing.assert_allclose(M @ [10, 20, 1], [20, 90, 1], atol=1e-9)
    boxes = A.warp_boxes(np.array([[10, 20, 30, 60]], np.float32), M, (100, 100))
    np.testing.assert_allclose(boxes, [[20, 70, 60, 90]], atol=1e-4)
    img = _canvas(100, 100)
    img[20:60, 10:30] = 255
    out = A.warp_image(img, M, (100, 100), use_perspective=False)
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert abs(xs.mean() - 39.5) <= 1 and abs(ys.mean() - 79.5) <= 1


def test_scale_and_border_change_output_size():
    img = _canvas(50, 80)
    out, t = A.random_perspective(img, np.zeros((0, 5), np.float32), border=(-10, 5), rng=np.random.default_rng(0))
    assert out.shape == (30, 90, 3) and t.shape == (0, 5)


def test_boxes_leaving_image_are_dropped():
    img = _canvas(100, 100)
    t = np.array([[0, 85, 85, 95, 95], [1, 50, 50, 70, 70], [2, 55, 55, 75, 75], [3, 10, 10, 30, 30]], np.float32)
    _, t2 = A.random_perspective(img, t, translate=0.4, rng=HighRng())  # shift by (+40, +40)
    # box 0 leaves the image; box 1 keeps 25% of its area; box 2 keeps 6% (< area_thr 10%)
    np.testing.assert_allclose(t2, [[1, 90, 90, 100, 100], [3, 50, 50, 70, 70]], atol=1e-4)


def test_box_candidates():
    before = np.array([[0, 0, 10, 10]] * 5, np.float32)
    after = np.array(
        [
            [0, 0, 10, 10],  # unchanged: kept
            [0, 0, 1.5, 10],  # narrower than wh_thr=2 px
            [0, 0, 3, 3],  # 9% of the area left
            [0, 0, 4, 4],  # 16%: kept
            [0, 0, 2.5, 300],  # aspect 120 > 100
        ],
        np.float32,
    )
    np.testing.assert_array_equal(A.box_candidates(before, after), [True, False, False, True, False])
    before[4] = [0, 0, 2.5, 300]
    assert not A.box_candidates(before[4:], after[4:], ar_thr=100)[0]
    assert A.box_candidates(before[4:], after[4:], ar_thr=200)[0]


# ---------------------------------------------------------------- colour and flips


def test_hsv_zero_gain_is_identity():
    img = np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    ref = img.copy()
    A.augment_hsv(img, 0, 0, 0, np.random.default_rng(0))
    np.testing.assert_array_equal(img, ref)


def test_hsv_value_gain_on_grey():
    img = _canvas(4, 4, 100)
    A.augment_hsv(img, 0.0, 0.0, 0.5, HighRng())  # V gain 1.5: grey 100 → grey 150
    assert (img == 150).all()
    img = _canvas(4, 4, 200)
    A.augment_hsv(img, 0.0, 0.0, 0.5, HighRng())  # clipped at 255
    assert (img == 255).all()


def test_hsv_random_gain_changes_colour_in_place():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 2] = 200  # red in BGR
    ref = img.copy()
    A.augment_hsv(img, 0.5, 0.5, 0.5, np.random.default_rng(3))
    assert img.dtype == np.uint8 and not np.array_equal(img, ref)


def test_flips():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    lab = np.array([[4, 0.2, 0.1, 0.3, 0.2]], np.float32)
    out, l2 = A.hflip(img, lab)
    np.testing.assert_array_equal(out[:, 0], img[:, 2])
    np.testing.assert_allclose(l2, [[4, 0.8, 0.1, 0.3, 0.2]])
    out, l3 = A.vflip(img, lab)
    np.testing.assert_array_equal(out[0], img[1])
    np.testing.assert_allclose(l3, [[4, 0.2, 0.9, 0.3, 0.2]])
    assert lab[0, 1] == pytest.approx(0.2)  # input not modified


def test_box_format_roundtrip():
    lab = np.array([[2, 0.5, 0.25, 0.5, 0.5]], np.float32)
    px = A.cxcywhn_to_xyxy(lab, 40, 20, padw=3, padh=1)
    np.testing.assert_allclose(px, [[2, 13, 1, 33, 11]])
    np.testing.assert_allclose(A.xyxy_to_cxcywhn(px - [0, 3, 1, 3, 1], 40, 20), lab)


# ---------------------------------------------------------------- mosaic and mixup


def test_build_mosaic_places_tiles_around_centre():
    s = 32
    imgs = [_canvas(s, s, 10 * (k + 1)) for k in range(4)]
    labels = [np.array([[k, 0.5, 0.5, 0.5, 0.5]], np.float32) for k in range(4)]
    canvas, t = A.build_mosaic(imgs, labels, s, HighRng())  # HighRng: centre at (48, 48)
    assert canvas.shape == (64, 64, 3)
    assert (canvas[16:48, 16:48] == 10).all()
    assert (canvas[16:48, 48:] == 20).all() and (canvas[48:, 16:48] == 30).all() and (canvas[48:, 48:] == 40).all()
    assert (canvas[:16] == 114).all() and (canvas[:, :16] == 114).all()
    # Tile 3 starts at (48, 48): its centred half-size box covers 8..24 inside it, clipped to 64.
    np.testing.assert_allclose(t, [[0, 24, 24, 40, 40], [1, 56, 24, 64, 40], [2, 24, 56, 40, 64], [3, 56, 56, 64, 64]])


def test_mosaic_shape_boxes_inside_and_deterministic():
    s = 64
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (s, 48 if k % 2 else s, 3), dtype=np.uint8) for k in range(4)]
    labels = [np.array([[k, 0.5, 0.5, 0.4, 0.6], [0, 0.2, 0.3, 0.1, 0.2]], np.float32) for k in range(4)]
    kw = dict(degrees=10, translate=0.1, scale=0.5, shear=2)
    out1, t1 = A.mosaic4(imgs, labels, s, np.random.default_rng(7), **kw)
    out2, t2 = A.mosaic4(imgs, labels, s, np.random.default_rng(7), **kw)
    assert out1.shape == (s, s, 3)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(t1, t2)
    assert len(t1) > 0 and (t1[:, 1:] >= 0).all() and (t1[:, 1:] <= s).all()
    assert (t1[:, 3] > t1[:, 1]).all() and (t1[:, 4] > t1[:, 2]).all()
    with pytest.raises(ValueError, match="even"):
        A.mosaic4(imgs, labels, 63, rng)


def test_mixup():
    a, b = _canvas(8, 8, 100), _canvas(8, 8, 200)
    ta, tb = np.ones((2, 5), np.float32), np.zeros((1, 5), np.float32)
    img, t = A.mixup(a, ta, b, tb, np.random.default_rng(0))
    assert img.shape == a.shape and img.dtype == np.uint8 and 100 < img[0, 0, 0] < 200
    assert t.shape == (3, 5)
