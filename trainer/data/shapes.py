"""Planning and drawing the synthetic shapes images (trainer/data/synthetic.py writes them).

The drawing, placement, backgrounds and split below serve both kinds of dataset: the default one
described here, and the long-tail one (trainer/data/longtail.py), which draws all ten SHAPE_NAMES
with other label shares, sizes and objects per image.

What the default images hold:

- six classes, filled with random colours (30% with an outline): circle, square, triangle, cross,
  star, hexagon. Polygons are rotated by up to ±15°. Sizes are log-uniform from 8% to 45% of the
  short side (at least 4 px). Up to 30% of an object may be cut by the border.
- 1-6 objects per image, box IoU < 0.3 and at most half of the smaller box covered.
- label shares near 35/25/18/12/7/3 %. The rarest class, **hexagon**, is confusable with the most
  common one, **circle**: same size distribution and colours, and at 128-256 px the only cue is six
  corners, which a model that rarely sees hexagons easily calls circles. About 90% of images hold no
  hexagon and about 70% neither hexagon nor star, so image weighting has images to up-weight.
- image k with ``k % 12 == 5`` holds a hexagon (placed first, so never dropped); this guarantees
  >= 16 hexagons once N >= 200. Image k with ``k % 32 == 31`` is a pure background (empty label file).
- backgrounds: a two-colour gradient + low-frequency colour noise + soft blotches + thin lines,
  plus mild sensor noise over the whole image, so objectness is not "anything that is not flat".
- 20% of images are 4:3 or 3:4 (long side = imgsz) to exercise letterbox and rect batching.
- val split: rare-class images are put into val first until val holds
  ``min(max(ceil(val_fraction * rare), 8), rare // 2)`` rare instances, so val holds >= 8 hexagons
  when N >= 200 while train keeps at least half of them; the rest of val is filled with non-rare
  images. Within each group images are taken in the order of a per-image random key, so an
  image's split rarely changes with N.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

# Every shape the generator can draw; a class id is an index into this tuple. The default dataset
# uses the first six, the long-tail one all ten.
SHAPE_NAMES = ("circle", "square", "triangle", "cross", "star", "hexagon", "diamond", "ring", "arrow", "heart")
CLASS_NAMES = SHAPE_NAMES[:6]
ROTATION_FREE = frozenset({0, 7})  # circle, ring: a rotation changes nothing, so none is drawn
RARE_CLASS = 5  # hexagon
CONFUSABLE_WITH = 0  # circle
# Class probabilities for objects that are not the forced hexagon; with one forced hexagon per
# 12 images (~42 labels) the label shares land near 35/25/18/12/7/3 %.
CLASS_PROBS = (0.36, 0.255, 0.185, 0.125, 0.07, 0.005)
RARE_EVERY, RARE_OFFSET = 12, 5
BACKGROUND_EVERY, BACKGROUND_OFFSET = 32, 31  # ~3% object-free images
MIN_VAL_RARE = 8
SIZE_RANGE = (0.08, 0.45)  # fraction of the short side
MIN_SIZE_PX = 4.0
MAX_IOU, MAX_COVER = 0.3, 0.5
MAX_OUTSIDE = 0.3  # fraction of a box allowed past each image border
NONSQUARE_P = 0.2
MAX_ROTATION_DEG = 15.0
OUTLINE_P = 0.3
MIN_CONTRAST = 90.0  # L2 distance in BGR between an object's fill and the background under it
SHIFT = 4  # OpenCV fixed-point bits: sub-pixel vertex positions
MAX_LINES = 4  # thin straight lines drawn over each background: 0 to MAX_LINES


@dataclass(frozen=True)
class ObjectPlan:
    """One shape: class id, centre and unrotated extent in pixels, rotation, outline width (0 = none)."""

    cls: int
    cx: float
    cy: float
    size: float
    angle: float
    outline: int


@dataclass(frozen=True)
class ImagePlan:
    """Everything that decides image `index`'s labels; colours and textures come from its render seed."""

    seed: int
    index: int
    height: int
    width: int
    split_key: float
    objects: tuple[ObjectPlan, ...]
    max_lines: int = MAX_LINES  # background clutter: up to this many thin lines

    @property
    def name(self) -> str:
        """File stem, e.g. ``syn_000123``."""
        return f"syn_{self.index:06d}"


@dataclass(frozen=True)
class Look:
    """What one kind of dataset draws differently: object sizes and background clutter."""

    size_range: tuple[float, float]  # (low, high) fraction of the short side; sizes are log-uniform
    max_lines: int = MAX_LINES


DEFAULT_LOOK = Look(SIZE_RANGE)

@dataclass(frozen=True)
class DatasetPlan:
    """All image plans and the split of each (``"train"`` or ``"val"``)."""

    images: tuple[ImagePlan, ...]
    splits: tuple[str, ...]


def _child_rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Spawn key (index,) equals SeedSequence(seed).spawn(N)[index] for any N > index.
    plan_ss, render_ss = np.random.SeedSequence(seed, spawn_key=(index,)).spawn(2)
    return np.random.default_rng(plan_ss), np.random.default_rng(render_ss)


def _regular(n: int, r: float = 0.5) -> np.ndarray:
    t = np.arange(n) * 2 * np.pi / n
    return r * np.stack([np.cos(t), np.sin(t)], 1)


@lru_cache(maxsize=None)
def _unit_contours(cls: int) -> tuple[np.ndarray, ...]:
    """(V, 2) vertex arrays of class `cls`, unrotated, bbox centred at 0 with longest side 1.

    The first contour is the outline; a ring's second one is its hole (fillPoly fills even-odd).
    """
    holes: tuple[np.ndarray, ...] = ()
    if cls == 7:  # ring: hole diameter 55% of the outer one, still open at 15 px (test_synthetic_longtail)
        pts, holes = _regular(48), (_regular(48, 0.275),)
    elif cls in (0, 5):  # circle as a 48-gon (< 0.2 px off at 256 px); hexagon flat-top
        pts = _regular(48 if cls == 0 else 6)
    elif cls == 1:
        pts = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif cls == 2:
        pts = np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * [1.0, math.sqrt(3) / 2]
    elif cls == 3:
        a, b = 1 / 6, 0.5  # arm half-width, arm length
        pts = np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                        [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])
    elif cls == 4:
        t = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif cls == 6:  # diamond: a rhombus 62% as wide as tall, so no rotated square looks like it
        pts = np.array([[0.0, -0.5], [0.31, 0.0], [0.0, 0.5], [-0.31, 0.0]])
    elif cls == 8:  # arrow pointing right: shaft 0.32 tall, head 0.76 tall
        pts = np.array([[-0.5, -0.16], [0.05, -0.16], [0.05, -0.38], [0.5, 0.0],
                        [0.05, 0.38], [0.05, 0.16], [-0.5, 0.16]])
    elif cls == 9:  # heart: the classic parametric curve, point down
        t = np.arange(40) * 2 * np.pi / 40
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        pts = np.stack([16 * np.sin(t) ** 3, -y], 1)
    else:
        raise ValueError(f"unknown class id {cls}")
    lo, hi = pts.min(0), pts.max(0)
    contours = tuple((c - (lo + hi) / 2) / (hi - lo).max() for c in (pts, *holes))
    for c in contours:
        c.setflags(write=False)
    return contours


def object_contours(obj: ObjectPlan) -> list[np.ndarray]:
    """(V, 2) float vertex arrays of `obj` in image pixels (x, y); the first is the outline."""
    t = math.radians(obj.angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return [c @ rot.T * obj.size + [obj.cx, obj.cy] for c in _unit_contours(obj.cls)]


def _box(obj: ObjectPlan, width: int, height: int) -> np.ndarray:
    """(4,) [x0, y0, x1, y1] of the drawn shape (outline included), clipped to the image."""
    poly = object_contours(obj)[0]  # holes lie inside the outline
    pad = obj.outline / 2
    lo, hi = poly.min(0) - pad, poly.max(0) + pad
    return np.clip(np.concatenate([lo, hi]), 0, [width, height, width, height])


def _overlaps(box: np.ndarray, others: list[np.ndarray]) -> bool:
    area = np.prod(box[2:] - box[:2])
    for o in others:
        inter = np.prod(np.clip(np.minimum(box[2:], o[2:]) - np.maximum(box[:2], o[:2]), 0, None))
        other = np.prod(o[2:] - o[:2])
        if inter / (area + other - inter) >= MAX_IOU or inter / min(area, other) > MAX_COVER:
            return True
    return False


def _default_classes(rng: np.random.Generator, index: int) -> list[int]:
    """Class ids of the default image `index`, in placement order: 1-6 draws, a forced hexagon first."""
    n = int(rng.integers(1, 7))
    classes = rng.choice(len(CLASS_NAMES), size=n, p=CLASS_PROBS)
    if index % RARE_EVERY == RARE_OFFSET:
        classes[0] = RARE_CLASS  # placed first, so it always fits
    return classes.tolist()


def place_objects(rng: np.random.Generator, classes: Sequence[int], width: int, height: int,
                  size_range: tuple[float, float]) -> tuple[ObjectPlan, ...]:
    """Size, rotate and place `classes` in order (sizes: see Look); an object that finds no free spot
    in 40 tries is dropped."""
    short = min(width, height)
    lo, hi = max(size_range[0] * short, MIN_SIZE_PX), max(size_range[1] * short, MIN_SIZE_PX)
    objects: list[ObjectPlan] = []
    boxes: list[np.ndarray] = []
    for cls in classes:
        size = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
        angle = 0.0 if cls in ROTATION_FREE else float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        outline = max(1, round(0.06 * size)) if rng.random() < OUTLINE_P else 0
        margin = (0.5 - MAX_OUTSIDE) * size  # centre may sit this close to the border
        for _ in range(40):
            cx = float(rng.uniform(margin, width - margin))
            cy = float(rng.uniform(margin, height - margin))
            obj = ObjectPlan(cls, cx, cy, size, angle, outline)
            box = _box(obj, width, height)
            if not _overlaps(box, boxes):
                objects.append(obj)
                boxes.append(box)
                break
    return tuple(objects)


def is_background(index: int) -> bool:
    """Whether image `index` is a pure background (empty label file), in either kind of dataset."""
    return index % BACKGROUND_EVERY == BACKGROUND_OFFSET


def plan_image_with(seed: int, index: int, imgsz: int, classes: Callable[[np.random.Generator], Sequence[int]],
                    look: Look) -> ImagePlan:
    """Plan image `index`: size, split key, then `classes(rng)` placed by `place_objects` (no pixels).

    The one planning path of both kinds of dataset; they differ only in `classes` and `look`.
    """
    rng, _ = _child_rngs(seed, index)
    split_key = float(rng.random())
    width = height = imgsz
    if rng.random() < NONSQUARE_P:
        short = int(round(imgsz * 3 / 4))
        width, height = (imgsz, short) if rng.random() < 0.5 else (short, imgsz)
    objects: tuple[ObjectPlan, ...] = ()
    if not is_background(index):
        objects = place_objects(rng, classes(rng), width, height, look.size_range)
    return ImagePlan(seed, index, height, width, split_key, objects, look.max_lines)


def plan_image(seed: int, index: int, imgsz: int) -> ImagePlan:
    """Plan image `index` of the default dataset with `seed`: size, split key and objects (no pixels)."""
    return plan_image_with(seed, index, imgsz, lambda rng: _default_classes(rng, index), DEFAULT_LOOK)


def assign_splits(plans: Sequence[ImagePlan], val_fraction: float, classes: Sequence[int] = (RARE_CLASS,),
                  min_val: int = MIN_VAL_RARE, min_train: int = 0) -> tuple[str, ...]:
    """Split images into train/val, stratified so val holds enough instances of each of `classes`.

    `classes` go rarest first. For each, images holding it (in split-key order) join val until val
    holds ``min(max(ceil(val_fraction * total), min_val), total // 2)`` instances of it; an image is
    skipped when it would leave train fewer than ``min_train`` instances of any of `classes` (unless
    that many cannot stay: val's own target comes first). The rest of val is filled in split-key
    order, images holding none of `classes` first, then those whose rarest class in `classes` comes
    last in it, so train keeps the rare instances.
    """
    n = len(plans)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    column = {c: j for j, c in enumerate(classes)}
    counts = np.zeros((n, len(classes)), np.int64)  # (n, C) instances of each stratified class
    for i, p in enumerate(plans):
        for o in p.objects:
            if o.cls in column:
                counts[i, column[o.cls]] += 1
    totals = counts.sum(0)
    targets = np.minimum(np.maximum(np.ceil(val_fraction * totals), min_val), totals // 2).astype(np.int64)
    caps = np.maximum(totals - min_train, targets)  # most instances of each class val may take
    by_key = sorted(range(n), key=lambda i: plans[i].split_key)
    val: set[int] = set()
    got = np.zeros(len(classes), np.int64)  # (C,) instances of each stratified class in val so far

    def fits(i: int) -> bool:
        return i not in val and bool(np.all(got + counts[i] <= caps))

    for j in range(len(classes)):
        for i in by_key:
            if not counts[i, j] or i in val:
                continue
            if got[j] >= targets[j] or len(val) >= n_val:
                break
            if fits(i):
                val.add(i)
                got += counts[i]
    # Position in `classes` of each image's rarest stratified class (len(classes) when none).
    rank = [int(np.flatnonzero(row)[0]) if row.any() else len(classes) for row in counts]
    fill = sorted(by_key, key=lambda i: -rank[i])  # stable: split-key order within a rank
    for capped in (True, False):  # past the caps only when they leave val short of images
        for i in fill:
            if len(val) >= n_val:
                break
            if fits(i) or (not capped and i not in val):
                val.add(i)
                got += counts[i]
    return tuple("val" if i in val else "train" for i in range(n))


def check_plan_args(images: int, imgsz: int, val_fraction: float) -> None:
    """Raise ValueError for arguments no dataset can be planned with."""
    if images < 4:
        raise ValueError(f"images must be >= 4 (train and val both need images), got {images}")
    if imgsz < 32:
        raise ValueError(f"imgsz must be >= 32, got {imgsz}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def plan_dataset(images: int, seed: int, imgsz: int = 256, val_fraction: float = 0.25) -> DatasetPlan:
    """Plan a whole dataset without rendering: cheap enough to count labels for thousands of images."""
    check_plan_args(images, imgsz, val_fraction)
    plans = tuple(plan_image(seed, k, imgsz) for k in range(images))
    return DatasetPlan(plans, assign_splits(plans, val_fraction))


def _background(plan: ImagePlan, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 BGR texture: gradient + low-frequency noise + soft blotches + thin lines."""
    h, w = plan.height, plan.width
    c0, c1 = rng.integers(30, 226, size=(2, 3)).astype(np.float32)
    t = math.radians(float(rng.uniform(0, 360)))
    xs, ys = np.arange(w, dtype=np.float32)[None] / w, np.arange(h, dtype=np.float32)[:, None] / h
    ramp = np.cos(t) * xs + np.sin(t) * ys  # (H, W)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)  # (H, W) in [0, 1]
    img = c0 + ramp[..., None] * (c1 - c0)  # (H, W, 3)
    g = int(rng.integers(3, 9))
    grid = rng.normal(0, rng.uniform(12, 25), size=(g, g, 3)).astype(np.float32)
    img += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    # Soft blotches: drawn at quarter resolution, upsampled and blurred, so their edges stay soft
    # and they never look like the hard-edged objects. `layer` is colour premultiplied by alpha.
    qh, qw = max(h // 4, 2), max(w // 4, 2)
    layer = np.zeros((qh, qw, 4), np.float32)  # (h/4, w/4, 4) [b*a, g*a, r*a, a]
    for _ in range(int(rng.integers(1, 5))):
        centre = (int(rng.integers(0, qw)), int(rng.integers(0, qh)))
        axes = (int(rng.integers(2, max(qw // 3, 3))), int(rng.integers(2, max(qh // 3, 3))))
        a = float(rng.uniform(0.2, 0.5))
        colour = (rng.integers(0, 256, size=3) * a).tolist() + [a]
        cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    layer = cv2.GaussianBlur(cv2.resize(layer, (w, h), interpolation=cv2.INTER_LINEAR), (0, 0), 2.0)
    img = img * (1 - layer[..., 3:]) + layer[..., :3]
    out = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, plan.max_lines + 1))):
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(out, p0, p1, rng.integers(0, 256, size=3).tolist(), int(rng.integers(1, 3)), cv2.LINE_AA)
    return out


def render_background(plan: ImagePlan) -> np.ndarray:
    """(H, W, 3) uint8 BGR background of image `plan`, before objects and sensor noise are added."""
    _, rng = _child_rngs(plan.seed, plan.index)
    return _background(plan, rng)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """(3,) float32 BGR fill at least MIN_CONTRAST from `under` (the mean background), or the best of 12."""
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.integers(0, 256, size=3).astype(np.float32)
        d = float(np.linalg.norm(c - under))
        if d > best_d:
            best, best_d = c, d
        if d >= MIN_CONTRAST:
            break
    return best


def _draw_object(img: np.ndarray, obj: ObjectPlan, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """Blend `obj` into float32 `img` (H, W, 3) in place; return its tight pixel box (x, y, w, h)."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = _box(obj, w, h)
    rx0, ry0 = max(int(x0) - 2, 0), max(int(y0) - 2, 0)
    rx1, ry1 = min(math.ceil(x1) + 2, w), min(math.ceil(y1) + 2, h)
    roi = img[ry0:ry1, rx0:rx1]  # view: edits land in img
    pts = [np.round((c - [rx0, ry0]) * (1 << SHIFT)).astype(np.int32) for c in object_contours(obj)]
    fill = np.zeros(roi.shape[:2], np.uint8)  # anti-aliased coverage, 0..255
    cv2.fillPoly(fill, pts, 255, lineType=cv2.LINE_AA, shift=SHIFT)
    inside = fill >= 128
    under = roi[inside].mean(0) if inside.any() else roi.reshape(-1, 3).mean(0)
    colour = _contrasting_colour(rng, under)
    a = fill[..., None].astype(np.float32) / 255
    roi[:] = roi * (1 - a) + colour * a
    drawn = inside
    if obj.outline:
        edge = np.zeros_like(fill)
        cv2.polylines(edge, pts, True, 255, thickness=obj.outline, lineType=cv2.LINE_AA, shift=SHIFT)
        # A darker or lighter shade of the fill, whichever stands out more from the background.
        shades = (colour * 0.35, colour + (255 - colour) * 0.6)
        rim = max(shades, key=lambda c: float(np.linalg.norm(c - under)))
        a = edge[..., None].astype(np.float32) / 255
        roi[:] = roi * (1 - a) + rim * a
        drawn = inside | (edge >= 128)
    x, y, bw, bh = cv2.boundingRect(drawn.astype(np.uint8))
    if bw == 0 or bh == 0:
        return None
    return rx0 + x, ry0 + y, bw, bh


def render_image(plan: ImagePlan) -> tuple[np.ndarray, np.ndarray]:
    """Render image `plan`: (H, W, 3) uint8 BGR image and (n, 5) labels [cls, cx, cy, w, h] normalised.

    Objects whose drawn footprint is empty (only possible at the smallest sizes) get no label.
    """
    _, rng = _child_rngs(plan.seed, plan.index)
    img = _background(plan, rng).astype(np.float32)
    rows = []
    for obj in plan.objects:
        box = _draw_object(img, obj, rng)
        if box is not None:
            x, y, bw, bh = box
            rows.append([obj.cls, (x + bw / 2) / plan.width, (y + bh / 2) / plan.height,
                         bw / plan.width, bh / plan.height])
    # Sensor noise over everything, so flat regions do not give objects away.
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0, 4))
    labels = np.array(rows, dtype=np.float64).reshape(-1, 5)
    return np.clip(img, 0, 255).astype(np.uint8), labels
