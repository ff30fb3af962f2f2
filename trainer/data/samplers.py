"""Per-epoch image samplers: which images an epoch trains on, and how often.

Every sampler turns the training labels, the class weights and the current per-class AP (`maps`)
into one number per image, then draws the epoch's list of n image indices from a generator seeded
by (seed, epoch). Under DDP rank 0 draws and broadcasts the list and each rank's
DistributedSampler takes a disjoint shard of it (trainer/fit.py); a resumed run redraws the same
list, so resume stays bitwise. Every epoch sees n images whatever the sampler (equal compute).

| kind       | image weight                                                           | draw              |
|------------|------------------------------------------------------------------------|-------------------|
| `uniform`  | none: each image once, in the loader's shuffled order                  | identity          |
| `classic`  | sum over its labels of `class_weights * (1 - maps) ** 2` (YOLOv5)      | `random.choices`  |
| `rfs`      | max over its classes of `r_c = max(1, sqrt(t / f_c))` (LVIS)           | repeat rounding   |
| `adaptive` | max over its classes of `max(1, (t / f_c) * deficit_c ** power)`       | repeat rounding   |

Beside the samplers, `loss_class_weights` turns the same deficit into a per-class weight of the
classification loss (--cls-feedback), for any sampler: image-level sampling cannot make a rare class
more than the share of labels its images hold, and the loss weight has no such ceiling.

`f_c` is the fraction of training images that hold class c. `deficit_c = (1 - maps_c) / mean(1 -
maps)` is how much worse than average class c is detected now: 1 for every class before the first
evaluation, above 1 for the classes the model gets wrong, below 1 for those it has learned, rare or
not. The floor of 1 keeps every image in play, so no class collapses. Background images repeat once
(`rfs`, `adaptive`) or never (`classic`, as YOLOv5).

Why `adaptive` drops RFS's square root: a rare class's images also hold common objects, so an
image-level sampler lifts the rare class's share of drawn labels far less than its repeat factor.
On the long-tail shapes (rare classes in 2-4 % of the images) `sqrt(t / f)` draws 6 % rare labels
at t = 0.1 and 8 % even at t = 1, where `classic`'s inverse label frequency draws 12-18 %, and a
first study run put classic's rare-class AP 4x above rfs's. Linear `t / f` keeps the max over an
image's classes (no favour for crowded images, unlike classic's sum) and draws 10 % before any
evaluation, 13 % once the deficit (power 2, as classic's `(1 - maps) ** 2`) says the rare classes
are the ones being missed, while frequent classes keep about two thirds of the labels (classic:
56-63 %).

"Repeat rounding" is LVIS's repeat factors at equal compute: image i is expected
`e_i = n * w_i / sum(w)` times; it appears floor(e_i) times plus once more for a systematic
sample over the fractional parts, so the list has exactly n entries and each image its floor or
ceiling. That is lower-variance than n independent draws and never skips an image that should
repeat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from trainer.data import weights as iw

log = logging.getLogger(__name__)

SAMPLERS = ("uniform", "classic", "rfs", "adaptive")
DEFICIT_CLIP = (0.25, 4.0)  # a learned class keeps at least a quarter of its factor; no class more than 4x


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler, and its knobs (the command line's --sampler, --rfs-t, --sampler-power)."""

    kind: str = "uniform"
    rfs_t: float = 0.1        # repeat threshold t; LVIS's 0.001 suits ~1,000 classes, not 10
    power: float = 2.0        # adaptive: exponent on the AP deficit

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ValueError(f"sampler {self.kind!r}: expected one of {', '.join(SAMPLERS)}")
        if not 0 < self.rfs_t <= 1:
            raise ValueError(f"rfs t must be in (0, 1], got {self.rfs_t}")
        if not 0 <= self.power <= 8:
            raise ValueError(f"sampler power must be in [0, 8], got {self.power}")


class LabelStats:
    """What the samplers need from the training labels, computed once per run."""

    def __init__(self, labels: Sequence[np.ndarray], nc: int):
        ids = iw.class_ids(labels, nc)  # checked against [0, nc)
        self.nc, self.n = nc, len(labels)
        self.counts = np.zeros((self.n, nc), np.int64)  # (n, nc) labels of each class per image
        for k, c in enumerate(ids):
            self.counts[k] = np.bincount(c, minlength=nc)
        self.present = self.counts > 0  # (n, nc)
        # (nc,) fraction of images holding each class; a class absent from training counts as one
        # image, like an empty class in the class weights, so its factor is large but finite.
        self.image_fraction = np.maximum(self.present.sum(0), 1) / max(self.n, 1)


def rfs_class_factors(stats: LabelStats, t: float) -> np.ndarray:
    """LVIS repeat factors per class: `max(1, sqrt(t / f_c))` → (nc,)."""
    return np.maximum(1.0, np.sqrt(t / stats.image_fraction))


def ap_deficit(maps: np.ndarray) -> np.ndarray:
    """`(1 - maps) / mean(1 - maps)`, clipped to DEFICIT_CLIP → (nc,); all ones when every class
    is equally good or bad (e.g. before the first evaluation)."""
    miss = 1.0 - np.clip(np.asarray(maps, np.float64), 0.0, 1.0)
    mean = float(miss.mean()) if miss.size else 0.0
    if mean <= 0:
        return np.ones_like(miss)
    return np.clip(miss / mean, *DEFICIT_CLIP)


def max_over_classes(stats: LabelStats, class_factor: np.ndarray) -> np.ndarray:
    """Per image, the largest factor of the classes it holds; 1 for a background → (n,)."""
    masked = np.where(stats.present, class_factor[None, :], 0.0)  # (n, nc)
    return np.maximum(masked.max(1, initial=0.0), 1.0)


def repeat_draw(weights: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """n indices where image i appears floor(e_i) or ceil(e_i) times, e_i = n * w_i / sum(w) → (n,).

    The extra copies come from a systematic sample over the fractional parts with one random offset;
    the list is then shuffled. Seeded by (seed, epoch), like every draw here."""
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("repeat_draw needs finite, non-negative weights with a positive sum")
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    expected = n * w / w.sum()
    base = np.floor(expected).astype(np.int64)
    frac = expected - base
    extra = n - int(base.sum())  # == round(frac.sum()), in [0, len(w))
    if extra > 0:
        edges = np.cumsum(frac)
        edges *= extra / edges[-1]  # guard float drift: the fractions sum to exactly `extra`
        points = rng.random() + np.arange(extra)
        picked = np.searchsorted(edges, points, side="right")
        np.add.at(base, np.minimum(picked, len(w) - 1), 1)
    out = np.repeat(np.arange(len(w), dtype=np.int64), base)
    rng.shuffle(out)
    return out


class ImageSampler:
    """One epoch's image list from (labels, class weights, maps): the interface all kinds share."""

    def __init__(self, config: SamplerConfig, stats: LabelStats, class_weights: np.ndarray):
        self.config, self.stats = config, stats
        self.class_weights = np.asarray(class_weights, np.float64)
        if self.class_weights.shape != (stats.nc,):
            raise ValueError(f"class_weights has shape {self.class_weights.shape}, expected ({stats.nc},)")

    @property
    def kind(self) -> str:
        return self.config.kind

    def class_factors(self, maps: np.ndarray) -> np.ndarray:
        """Per class, how strongly the sampler favours it this epoch → (nc,) (1 = no preference)."""
        k = self.config.kind
        if k == "uniform":
            return np.ones(self.stats.nc)
        if k == "classic":
            return iw.epoch_class_weights(self.class_weights, maps)
        if k == "rfs":
            return rfs_class_factors(self.stats, self.config.rfs_t)
        rarity = self.config.rfs_t / self.stats.image_fraction  # (nc,) linear, not RFS's square root
        return np.maximum(1.0, rarity * ap_deficit(maps) ** self.config.power)

    def image_weights(self, maps: np.ndarray) -> np.ndarray | None:
        """Per image weight → (n,); None for `uniform` (no weighting)."""
        k = self.config.kind
        if k == "uniform":
            return None
        factors = self.class_factors(maps)
        if k == "classic":
            return self.stats.counts @ factors  # (n, nc) @ (nc,): a sum over the image's labels
        return max_over_classes(self.stats, factors)

    def draw(self, maps: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """This epoch's n image indices → (n,) int64."""
        n, w = self.stats.n, self.image_weights(maps)
        if w is None:
            return np.arange(n, dtype=np.int64)
        if self.config.kind == "classic":
            if not w.sum() > 0:  # draw_indices then draws uniformly: say so rather than hide it
                log.warning("epoch %d: every image weight is zero (AP 1.0 for every labelled class?): this epoch "
                            "draws uniformly, background images included", epoch)
            return iw.draw_indices(w, n, seed, epoch)
        return repeat_draw(w, n, seed, epoch)


def expected_class_share(sampler: ImageSampler, maps: np.ndarray) -> np.ndarray:
    """The share of drawn labels each class gets in expectation → (nc,) summing to 1 (0s if no labels)."""
    w = sampler.image_weights(maps)
    w = np.ones(sampler.stats.n) if w is None or w.sum() <= 0 else w
    labels = (w / w.sum()) @ sampler.stats.counts  # (nc,)
    total = labels.sum()
    return labels / total if total > 0 else labels



def loss_class_weights(maps: np.ndarray, power: float) -> np.ndarray:
    """The evaluation-driven class weight of the classification loss (--cls-feedback POWER):
    `deficit_c ** power`, normalised to mean 1 so the loss keeps its scale → (nc,). All ones before
    the first evaluation or with power 0."""
    w = ap_deficit(maps) ** float(power)
    return w / w.mean() if w.size else w
