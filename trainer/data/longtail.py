"""Long-tail kind of the synthetic shapes dataset: ten classes whose label shares span ~60x.

Runbook::

    python -m trainer.data.synthetic --out /tmp/lt1500 --images 1500 --seed 0 --imgsz 128 --long-tail

Only what differs from the default dataset lives here: the class draw, object sizes, objects per
image, the split rule's numbers and the rare/common/frequent groups. Planning, placement, drawing,
backgrounds (~3%, image k with ``k % 32 == 31``) and the split mechanism are trainer/data/shapes.py's.

- classes: all ten ``SHAPE_NAMES``; label shares ``LONGTAIL_SHARES``, Zipf-like and hand-rounded,
  from 50.6% (circle) to 0.8% (hexagon; the per-block minimum lifts it to ~0.9%).
- objects are 25-50% of the short side (the default: 8-45%) and backgrounds carry at most one thin
  line (the default: up to 4), so every class is a clear shape at a training size of 128 px; an
  image holds 1-4 objects (uniform; the default: 1-6). (30 epochs of yolov5n from scratch at 128 px
  learn circle but few other classes, at 15-45% and 4 lines as at this setting: the classification
  loss hardly falls, so there the training budget limits, not the images.)
- the class draw is stratified per block of ``BLOCK_IMAGES`` images: the block's object slots are
  dealt from a shuffled urn that holds each class in proportion to its share (largest remainder),
  and at least ``MIN_PER_BLOCK`` of each. So each object's class follows the shares and no image is
  made to hold a rare class (co-occurrence stays natural: a rare object shares its image with 0-3
  others, and is alone in ~10% of cases), yet every full block holds >= 4 of each class, which is
  >= 20 per 1000 images. Image k depends on its block only, never on N. Within an image rarer
  classes are placed first, so when a crowded image has no room left it drops a common object
  (with at most 4 objects none is dropped in practice: none in 20,000 planned images).
- confusable pairs: the rarest class, **hexagon**, and the rare **ring** look like the most common
  one, **circle** (same outline; six corners, or a hole, are the only cues). ``rare_class`` is hexagon.
- split: shapes.assign_splits over every class but circle, rarest first, so val holds >= ``MIN_VAL``
  instances of every class and train keeps >= ``MIN_TRAIN`` once N >= 1000 (val is where per-class
  AP is measured); circle-only images and backgrounds fill the rest of val in split-key order.
- groups: each class is rare, common or frequent by its label share in the train split (``GROUPS_RULE``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from trainer.data import shapes

LONGTAIL_NAMES = shapes.SHAPE_NAMES
#                  circle square triangle cross star hexagon diamond ring  arrow heart
LONGTAIL_SHARES = (0.506, 0.17, 0.115, 0.045, 0.028, 0.008, 0.065, 0.012, 0.035, 0.016)
RARE_CLASS = 5  # hexagon: the rarest class, and confusable with the most common one
CONFUSABLE_PAIRS = ((5, 0), (7, 0))  # (rare, common): hexagon-circle, ring-circle
LOOK = shapes.Look(size_range=(0.25, 0.5), max_lines=1)  # large objects, little clutter: learnable at 128 px
OBJECTS_PER_IMAGE = (1, 4)  # inclusive, uniform
BLOCK_IMAGES = 200
MIN_PER_BLOCK = 4  # 4 * (1000 // 200) = 20 >= MIN_VAL + MIN_TRAIN + 2 spare for co-occurring picks
BLOCK_STREAM = 2**32 - 1  # first spawn-key word of the block urns; image k uses (k,)
MIN_VAL, MIN_TRAIN = 6, 12
GROUP_BOUNDS = (0.02, 0.10)  # label-share bounds between rare | common | frequent
GROUPS_RULE = ("by label share in the train split: rare < 2%, common 2% to < 10%, frequent >= 10% "
               "(LVIS groups by image count; shares suit a generator whose images hold 1-4 objects)")
# Rarest first: the order in which assign_splits stratifies val. The most common class is left out:
# it is in val anyway, and leaving it out lets circle-only images and backgrounds fill val's rest.
RAREST_FIRST = tuple(sorted(range(len(LONGTAIL_NAMES)), key=lambda c: LONGTAIL_SHARES[c]))[:-1]


def block_quotas(slots: int) -> np.ndarray:
    """(C,) how many of `slots` object slots each class gets: shares by largest remainder, then at
    least MIN_PER_BLOCK of each, the difference taken from the most common class."""
    raw = slots * np.asarray(LONGTAIL_SHARES)
    quotas = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - quotas), kind="stable")
    quotas[order[: slots - int(quotas.sum())]] += 1
    lifted = np.maximum(quotas, MIN_PER_BLOCK)
    lifted[int(np.argmax(LONGTAIL_SHARES))] -= int(lifted.sum()) - slots
    return lifted


@lru_cache(maxsize=16)
def _block_classes(seed: int, block: int) -> tuple[tuple[int, ...], ...]:
    """Class ids of each image of `block` (BLOCK_IMAGES images), rarest first; () for backgrounds."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(BLOCK_STREAM, block)))
    first = block * BLOCK_IMAGES
    counts = rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1, size=BLOCK_IMAGES)
    counts[[shapes.is_background(first + i) for i in range(BLOCK_IMAGES)]] = 0
    urn = np.repeat(np.arange(len(LONGTAIL_NAMES)), block_quotas(int(counts.sum())))
    rng.shuffle(urn)
    ends = np.cumsum(counts)
    return tuple(tuple(sorted(urn[e - n : e].tolist(), key=LONGTAIL_SHARES.__getitem__))
                 for e, n in zip(ends.tolist(), counts.tolist()))


def image_classes(seed: int, index: int) -> tuple[int, ...]:
    """Class ids of long-tail image `index`, in placement order (rarest first)."""
    return _block_classes(seed, index // BLOCK_IMAGES)[index % BLOCK_IMAGES]


def plan_image(seed: int, index: int, imgsz: int) -> shapes.ImagePlan:
    """Plan long-tail image `index` of the dataset with `seed` (no pixels)."""
    return shapes.plan_image_with(seed, index, imgsz, lambda rng: image_classes(seed, index), LOOK)


def plan_dataset(images: int, seed: int, imgsz: int = 256, val_fraction: float = 0.25) -> shapes.DatasetPlan:
    """Plan a whole long-tail dataset without rendering, its val split stratified over every class."""
    shapes.check_plan_args(images, imgsz, val_fraction)
    plans = tuple(plan_image(seed, k, imgsz) for k in range(images))
    splits = shapes.assign_splits(plans, val_fraction, RAREST_FIRST, min_val=MIN_VAL, min_train=MIN_TRAIN)
    return shapes.DatasetPlan(plans, splits)


def class_groups(counts: Sequence[int]) -> tuple[str, ...]:
    """The group ("rare", "common" or "frequent") of each class, from its label counts (see GROUPS_RULE)."""
    total = max(int(sum(counts)), 1)
    lo, hi = GROUP_BOUNDS
    return tuple("rare" if c / total < lo else "common" if c / total < hi else "frequent" for c in counts)
