"""Image augmentation for detection: letterbox, random perspective, HSV, flips, mosaic, mixup.

Images are HWC uint8 BGR numpy arrays (OpenCV's layout). Box arrays are either
`(n, 5) [cls, x1, y1, x2, y2]` in pixels ("px targets") or `(n, 5) [cls, cx, cy, w, h]` normalised
to [0, 1] ("normalised labels"), as each function says. All randomness comes from the
`np.random.Generator` passed in, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114  # grey fill for letterbox borders, mosaic canvas and warped-in areas


def letterbox(
    img: np.ndarray,
    new_shape: int | tuple[int, int] = (640, 640),
    color: tuple[int, int, int] = (PAD_VALUE,) * 3,
    auto: bool = False,
    scale_fill: bool = False,
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping the aspect ratio, then pad to `new_shape` (h, w).

    Returns (img, (rw, rh) resize ratios, (padw, padh) left/top padding in pixels).
    The total padding dw is split as left = round(dw/2 - 0.1), right = round(dw/2 + 0.1), so an
    odd total puts the extra pixel on the right/bottom; the returned padding is the applied left/top
    one (YOLOv5 returns dw/2, half a pixel off the image for odd totals). `auto` pads only to the next multiple of
    `stride`; `scale_fill` stretches to `new_shape` without padding; `scaleup=False` never enlarges.
    """
    h, w = img.shape[:2]
    nh, nw = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    r = min(nh / h, nw / w)
    if not scaleup:
        r = min(r, 1.0)
    uw, uh = round(w * r), round(h * r)  # size after resizing, before padding
    ratio = (uw / w, uh / h)
    dw, dh = nw - uw, nh - uh
    if auto:
        dw, dh = dw % stride, dh % stride
    elif scale_fill:
        dw, dh = 0, 0
        uw, uh = nw, nh
        ratio = (nw / w, nh / h)
    if (w, h) != (uw, uh):
        img = cv2.resize(img, (uw, uh), interpolation=cv2.INTER_LINEAR)
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img, ratio, (float(left), float(top))


# ---------------------------------------------------------------- geometric warps


@dataclass(frozen=True)
class PerspectiveParams:
    """One draw of warp parameters (angles in degrees, translation as a fraction of the output)."""

    angle: float = 0.0
    scale: float = 1.0
    shear_x: float = 0.0
    shear_y: float = 0.0
    persp_x: float = 0.0
    persp_y: float = 0.0
    tx: float = 0.5  # output position of the input's centre, fraction of output width
    ty: float = 0.5


def sample_perspective(
    rng: np.random.Generator, degrees: float, translate: float, scale: float, shear: float, perspective: float
) -> PerspectiveParams:
    """Draw warp parameters uniformly in the YOLOv5 ranges."""
    u = rng.uniform
    return PerspectiveParams(
        persp_x=u(-perspective, perspective),
        persp_y=u(-perspective, perspective),
        angle=u(-degrees, degrees),
        scale=u(1 - scale, 1 + scale),
        shear_x=u(-shear, shear),
        shear_y=u(-shear, shear),
        tx=u(0.5 - translate, 0.5 + translate),
        ty=u(0.5 - translate, 0.5 + translate),
    )


def perspective_matrix(p: PerspectiveParams, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """3x3 matrix M = T @ S @ R @ P @ C mapping input pixels (x, y, 1) to output pixels.

    C moves the input centre to the origin, P adds perspective, R rotates (counter-clockwise on
    screen for a positive angle) and scales, S shears, T moves the origin to (tx*W, ty*H).
    """
    C = np.eye(3)
    C[0, 2], C[1, 2] = -in_hw[1] / 2, -in_hw[0] / 2
    P = np.eye(3)
    P[2, 0], P[2, 1] = p.persp_x, p.persp_y
    a = math.radians(p.angle)
    cos, sin = p.scale * math.cos(a), p.scale * math.sin(a)
    R = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])  # y points down
    S = np.eye(3)
    S[0, 1], S[1, 0] = math.tan(math.radians(p.shear_x)), math.tan(math.radians(p.shear_y))
    T = np.eye(3)
    T[0, 2], T[1, 2] = p.tx * out_hw[1], p.ty * out_hw[0]
    return T @ S @ R @ P @ C


def warp_boxes(boxes: np.ndarray, M: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Warp (n, 4) xyxy px boxes: transform the 4 corners, take the enclosing box, clip."""
    n = len(boxes)
    if n == 0:
        return np.zeros((0, 4), np.float32)
    xy = np.ones((n * 4, 3))
    xy[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)  # corners x1y1 x2y2 x1y2 x2y1
    xy = xy @ M.T
    xy = xy[:, :2] / xy[:, 2:3]  # the divisor is 1 for affine M
    xy = xy.reshape(n, 8)
    x, y = xy[:, 0::2], xy[:, 1::2]
    out = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, out_hw[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, out_hw[0])
    return out.astype(np.float32)


def box_candidates(
    before: np.ndarray, after: np.ndarray, wh_thr: float = 2, ar_thr: float = 100, area_thr: float = 0.1, eps=1e-16
) -> np.ndarray:
    """Mask (n,) of warped boxes worth keeping; `before`/`after` are (n, 4) xyxy px.

    Keep a box wider and taller than `wh_thr` px, with an aspect ratio below `ar_thr` (the later
    YOLOv5 value 100; the mid-2020 value was 20) and at least `area_thr` of its area before the
    warp (`before` should already include the warp's scale factor).
    """
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def random_perspective(
    img: np.ndarray,
    targets: np.ndarray,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation/perspective of an image and its (n, 5) px targets.

    The output is (h + 2*border[0], w + 2*border[1]); a negative border crops (mosaic: 2s → s).
    Boxes that become too small or thin are dropped (see `box_candidates`).
    """
    rng = rng if rng is not None else np.random.default_rng()
    out_hw = (img.shape[0] + 2 * border[0], img.shape[1] + 2 * border[1])
    p = sample_perspective(rng, degrees, translate, scale, shear, perspective)
    M = perspective_matrix(p, img.shape[:2], out_hw)
    img = warp_image(img, M, out_hw, use_perspective=perspective != 0)
    if len(targets) == 0:
        return img, np.zeros((0, 5), np.float32)
    boxes = warp_boxes(targets[:, 1:5], M, out_hw)
    keep = box_candidates(targets[:, 1:5] * p.scale, boxes)
    return img, np.concatenate([targets[keep, :1], boxes[keep]], 1).astype(np.float32)


def warp_image(img: np.ndarray, M: np.ndarray, out_hw: tuple[int, int], use_perspective: bool) -> np.ndarray:
    """Warp with M into an out_hw image, filling with grey; skipped when M is the identity."""
    if out_hw == img.shape[:2] and np.array_equal(M, np.eye(3)):
        return img
    dsize, fill = (out_hw[1], out_hw[0]), (PAD_VALUE,) * 3
    if use_perspective:
        return cv2.warpPerspective(img, M, dsize=dsize, borderValue=fill)
    return cv2.warpAffine(img, M[:2], dsize=dsize, borderValue=fill)


# ---------------------------------------------------------------- colour and flips


def augment_hsv(img: np.ndarray, hgain: float, sgain: float, vgain: float, rng: np.random.Generator) -> None:
    """Scale hue, saturation and value by random gains in [1-g, 1+g], in place (BGR uint8)."""
    if not (hgain or sgain or vgain):
        return  # a BGR→HSV→BGR round trip is lossy; skip it when nothing would change
    r = rng.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float64)
    lut_h = ((x * r[0]) % 180).astype(np.uint8)  # OpenCV 8-bit hue is 0..179 and wraps around
    lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)


def hflip(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right; labels (n, 5) normalised [cls, cx, cy, w, h] get cx → 1 - cx."""
    labels = labels.copy()
    labels[:, 1] = 1 - labels[:, 1]
    return np.ascontiguousarray(img[:, ::-1]), labels


def vflip(img: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror top-bottom; labels (n, 5) normalised [cls, cx, cy, w, h] get cy → 1 - cy."""
    labels = labels.copy()
    labels[:, 2] = 1 - labels[:, 2]
    return np.ascontiguousarray(img[::-1]), labels


# ---------------------------------------------------------------- box formats


def cxcywhn_to_xyxy(labels: np.ndarray, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
    """(n, 5) normalised [cls, cx, cy, w, h] → (n, 5) px [cls, x1, y1, x2, y2] on a w x h image + pad."""
    out = labels.astype(np.float32, copy=True)
    out[:, 1] = w * (labels[:, 1] - labels[:, 3] / 2) + padw
    out[:, 2] = h * (labels[:, 2] - labels[:, 4] / 2) + padh
    out[:, 3] = w * (labels[:, 1] + labels[:, 3] / 2) + padw
    out[:, 4] = h * (labels[:, 2] + labels[:, 4] / 2) + padh
    return out


def xyxy_to_cxcywhn(targets: np.ndarray, w: float, h: float) -> np.ndarray:
    """(n, 5) px [cls, x1, y1, x2, y2] → (n, 5) [cls, cx, cy, w, h] normalised by a w x h image."""
    out = targets.astype(np.float32, copy=True)
    out[:, 1] = (targets[:, 1] + targets[:, 3]) / 2 / w
    out[:, 2] = (targets[:, 2] + targets[:, 4]) / 2 / h
    out[:, 3] = (targets[:, 3] - targets[:, 1]) / w
    out[:, 4] = (targets[:, 4] - targets[:, 2]) / h
    return out


# ---------------------------------------------------------------- mosaic and mixup


def build_mosaic(
    imgs: Sequence[np.ndarray], labels: Sequence[np.ndarray], s: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Place 4 images around a random centre of a 2s x 2s grey canvas.

    `labels[k]` are (n, 5) normalised to `imgs[k]`. Tile 0 ends at the centre (top-left quadrant),
    1 starts right of it (top-right), 2 below it (bottom-left), 3 at it (bottom-right); parts off
    the canvas are cut. Returns (canvas, (N, 5) px targets [cls, x1, y1, x2, y2] clipped to it).
    """
    if len(imgs) != 4 or len(labels) != 4:
        raise ValueError(f"mosaic needs 4 images and 4 label arrays, got {len(imgs)} and {len(labels)}")
    xc, yc = (int(rng.uniform(s / 2, 3 * s / 2)) for _ in range(2))
    canvas = np.full((2 * s, 2 * s, imgs[0].shape[2]), PAD_VALUE, dtype=np.uint8)
    out = []
    for k, (img, lab) in enumerate(zip(imgs, labels)):
        h, w = img.shape[:2]
        ox = xc - w if k in (0, 2) else xc  # tile's top-left corner on the canvas (may be < 0)
        oy = yc - h if k in (0, 1) else yc
        x1, y1, x2, y2 = max(ox, 0), max(oy, 0), min(ox + w, 2 * s), min(oy + h, 2 * s)
        canvas[y1:y2, x1:x2] = img[y1 - oy : y2 - oy, x1 - ox : x2 - ox]
        out.append(cxcywhn_to_xyxy(lab, w, h, ox, oy))
    targets = np.concatenate(out, 0) if out else np.zeros((0, 5), np.float32)
    targets[:, 1:] = targets[:, 1:].clip(0, 2 * s)
    return canvas, targets


def mosaic4(
    imgs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    s: int,
    rng: np.random.Generator,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
    perspective: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """4-image mosaic cropped back to s x s by a random perspective → (img, (n, 5) px targets)."""
    if s % 2:
        raise ValueError(f"mosaic size must be even, got {s}")
    canvas, targets = build_mosaic(imgs, labels, s, rng)
    b = -s // 2
    return random_perspective(canvas, targets, degrees, translate, scale, shear, perspective, (b, b), rng)


def mixup(
    img1: np.ndarray, t1: np.ndarray, img2: np.ndarray, t2: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(8, 8) ratio and keep both label sets."""
    r = rng.beta(8.0, 8.0)
    img = (img1.astype(np.float32) * r + img2.astype(np.float32) * (1 - r)).round().astype(np.uint8)
    return img, np.concatenate([t1, t2], 0)
