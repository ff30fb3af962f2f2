"""Validation's letterbox for a single image, so `predict` sees the pixels `evaluate` sees.

`trainer.data.dataset.YoloDataset` (rect validation) resizes the long side to `imgsz` (INTER_AREA
when shrinking, short side rounded up: `resized_hw`), then pads to its batch's shape, a stride
multiple with half a stride of margin (`pad=0.5`). Here every image is its own batch, so its shape
is the one a validation batch of that image alone gets, and the detections are the ones
`trainer.evaluate --batch-size 1` reports (tests/test_predict.py checks it). A model exported with
a fixed input size gets that size instead, the image letterboxed into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from trainer.data.augment import letterbox
from trainer.data.image_cache import resized_hw

RECT_PAD = 0.5  # validation's margin, in strides (YOLOv5 val.py's pad=0.5)


class ImageError(ValueError):
    """An image that cannot be read or used; the message names it."""


def rect_shape(h0: int, w0: int, imgsz: int, stride: int, pad: float = RECT_PAD) -> tuple[int, int]:
    """The (H, W) network input of an (h0, w0) image in a rect validation batch of its own."""
    ar = h0 / w0
    rel = (ar, 1.0) if ar < 1 else (1.0, 1 / ar) if ar > 1 else (1.0, 1.0)  # as YoloDataset._make_rect_batches
    return tuple(int(math.ceil(r * imgsz / stride + pad)) * stride for r in rel)  # type: ignore[return-value]


@dataclass(frozen=True)
class Letterboxed:
    """One image ready for the model and what maps its boxes back."""

    chw: np.ndarray  # (3, H, W) uint8 RGB
    original_hw: tuple[int, int]
    ratio_pad: tuple[tuple[float, float], tuple[float, float]]  # ((rh, rw), (padw, padh)), as the dataset's shapes


def as_bgr(image: np.ndarray, name: str) -> np.ndarray:
    """A (H, W, 3) uint8 BGR view of an array given to the API; grey and BGRA are converted."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ImageError(f"{name}: expected a uint8 numpy array (OpenCV BGR), got "
                         f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ImageError(f"{name}: expected an (H, W, 3) BGR image, got shape {image.shape}")
    return image


def prepare(image: np.ndarray, imgsz: int, stride: int, fixed_hw: tuple[int, int] | None = None) -> Letterboxed:
    """(H, W, 3) BGR uint8 -> the letterboxed (3, H', W') RGB input and its inverse mapping."""
    h0, w0 = image.shape[:2]
    h, w = resized_hw(h0, w0, imgsz)
    if (h, w) != (h0, w0):
        # The dataset's choice: INTER_AREA when shrinking for evaluation, INTER_LINEAR when enlarging.
        interp = cv2.INTER_AREA if max(h, w) < max(h0, w0) else cv2.INTER_LINEAR
        image = cv2.resize(image, (w, h), interpolation=interp)
    shape = fixed_hw or rect_shape(h0, w0, imgsz, stride)
    image, (rw, rh), pad = letterbox(image, shape, auto=False, scaleup=False, stride=stride)
    chw = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
    return Letterboxed(chw, (h0, w0), ((h * rh / h0, w * rw / w0), pad))
