"""Class and image weights for evaluation-driven image sampling (YOLOv5 `--image-weights`).

Before each epoch (or block of epochs) every image gets the weight
`sum over its labels of class_weights[cls] * (1 - maps[cls]) ** 2`, and the epoch's image list is
drawn with replacement in proportion to it. Labels are the dataset's (n, 5) [cls, cx, cy, w, h]
arrays.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np


def class_ids(labels: Sequence[np.ndarray], nc: int) -> list[np.ndarray]:
    """Per image, its labels' class ids → list of (m,) int64; ValueError names an id out of [0, nc)."""
    ids = [np.asarray(lab).reshape(-1, 5)[:, 0].astype(np.int64) for lab in labels]
    for k, c in enumerate(ids):
        if len(c) and (c.min() < 0 or c.max() >= nc):
            raise ValueError(f"image {k}: class id out of range [0, {nc}): {sorted(set(c.tolist()))}")
    return ids


def class_counts(labels: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """Number of labels of each class over all images → (nc,) int64."""
    if nc < 1:
        raise ValueError(f"nc must be >= 1, got {nc}")
    ids = class_ids(labels, nc)
    return np.bincount(np.concatenate(ids) if ids else np.zeros(0, np.int64), minlength=nc)


def class_weights(labels: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """Inverse label frequency per class, an empty class counting as 1, normalised to sum 1 → (nc,)."""
    counts = class_counts(labels, nc).astype(np.float64)
    counts[counts == 0] = 1  # an unseen class gets the largest weight, not a division by zero
    w = 1.0 / counts
    return w / w.sum()


def image_weights(labels: Sequence[np.ndarray], nc: int, class_weights: np.ndarray) -> np.ndarray:
    """Per image, the sum over its labels of `class_weights[cls]` → (n,).

    As in YOLOv5, a background image (no labels) gets weight 0 and is therefore never drawn while
    image weighting is on.
    """
    cw = np.asarray(class_weights, np.float64).reshape(-1)
    if len(cw) != nc:
        raise ValueError(f"class_weights has {len(cw)} entries, expected nc={nc}")
    ids = class_ids(labels, nc)
    per_image = np.stack([np.bincount(c, minlength=nc) for c in ids]) if ids else np.zeros((0, nc))
    return per_image @ cw  # (n, nc) counts @ (nc,) weights


def epoch_class_weights(class_weights: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Weights favouring badly detected classes: `class_weights * (1 - maps) ** 2` → (nc,)."""
    cw, m = np.asarray(class_weights, np.float64), np.asarray(maps, np.float64)
    if cw.shape != m.shape:
        raise ValueError(f"class_weights {cw.shape} and maps {m.shape} differ in shape")
    return cw * (1 - m) ** 2


def draw_indices(weights: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """Draw n image indices with replacement in proportion to `weights` → (n,) int64.

    Same result as `random.choices(range(len(weights)), weights, k=n)` with a `random.Random`
    seeded by the string f"{seed}-{epoch}" (seeding from a str is stable across processes and
    Python runs), so a resumed run, or every rank, draws the same list. All-zero weights fall back
    to a uniform draw.
    """
    w = np.asarray(weights, np.float64).reshape(-1)
    if len(w) == 0:
        raise ValueError("no weights to draw from")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("image weights must be finite and non-negative")
    rnd = random.Random(f"{seed}-{epoch}")
    wl = w.tolist() if w.sum() > 0 else None
    return np.asarray(rnd.choices(range(len(w)), weights=wl, k=n), dtype=np.int64)


def draw_counts(indices: Sequence[int], labels: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """Number of labels of each class in the drawn image list (an image drawn twice counts twice) → (nc,)."""
    per_image = np.stack([np.bincount(c, minlength=nc) for c in class_ids(labels, nc)]) if len(labels) else None
    if per_image is None or len(indices) == 0:
        return np.zeros(nc, np.int64)
    return per_image[np.asarray(indices, np.int64)].sum(0).astype(np.int64)
