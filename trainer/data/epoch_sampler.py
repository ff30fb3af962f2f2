"""The training loader's sampler: it carries each epoch's drawn image list to the workers.

`EpochSampler.set_epoch(epoch, draw)` takes the epoch's list of n image indices (from
trainer/data/samplers.py, identical on every rank). Iterating yields one `Sample` per position the
rank trains on, and each `Sample` says everything the dataset needs to build the item:

- `image`: which image;
- `partners`: the mosaic's 3 extra tiles and mixup's 4 (drawn from the same list, as YOLOv5 draws
  them from its weighted `indices`);
- `seed`: (dataset seed, epoch, position), the augmentation generator's seed.

So a worker holds no state that changes between epochs. Loader workers can persist across epochs
and validations, and an item depends only on (seed, epoch, position): not on the worker count,
the world size or how many epochs the process ran before. That is what makes resume bitwise.

Under DDP each rank takes a disjoint shard of the shuffled positions, padded by wrapping around to
a multiple of the world size as torch's DistributedSampler does. With rect batches
(`whole_batches`) positions are not shuffled and each rank takes whole batches (batch b goes to rank
b % world_size), because a rect batch's shape belongs to its positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

PARTNERS = 7  # mosaic: 3 tiles; mixup: a second mosaic (1 + 3)


@dataclass(frozen=True)
class Sample:
    """One training item: a position in the epoch's draw, its image, partners and generator seed."""

    position: int
    image: int
    partners: tuple[int, ...]
    seed: tuple[int, ...]


class EpochSampler(Sampler[Sample]):
    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, whole_batches: bool = False):
        if n < 1:
            raise ValueError("EpochSampler needs at least one image")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle = shuffle and not whole_batches
        self.rank, self.world_size, self.whole_batches = rank, world_size, whole_batches
        self.epoch = 0
        self.draw = np.arange(n, dtype=np.int64)
        self.skip = 0

    def set_epoch(self, epoch: int, draw: np.ndarray | None = None, skip: int = 0) -> None:
        """The epoch to iterate next and its image list (default: every image once). `skip` leaves
        out the epoch's first `skip` items over all ranks, the ones a stopped run already trained
        (trainer/preempt.py); it must be a whole number of global batches."""
        if draw is not None:
            draw = np.asarray(draw, dtype=np.int64).reshape(-1)
            if len(draw) != self.n or (len(draw) and (draw.min() < 0 or draw.max() >= self.n)):
                raise ValueError(f"the draw must hold {self.n} indices in [0, {self.n}), got {len(draw)}")
        if skip < 0 or skip % (self.batch_size * self.world_size):
            raise ValueError(f"skip {skip} must be a multiple of the global batch {self.batch_size * self.world_size}")
        self.epoch, self.skip = epoch, skip
        self.draw = np.arange(self.n, dtype=np.int64) if draw is None else draw

    def global_batches(self) -> list[list[np.ndarray]]:
        """The epoch's global batches in training order, each as its per-rank position arrays:
        global batch k is the k-th batch of every rank. Which positions a global batch holds is the
        same for any world size with the same global batch size, which lets a stopped epoch finish
        at another world size."""
        w = self.world_size
        if self.whole_batches:  # rect: batch b goes to rank b % world_size
            batches = [np.arange(s, min(s + self.batch_size, self.n)) for s in range(0, self.n, self.batch_size)]
            batches += batches[: (-len(batches)) % w]  # every rank gets as many batches
            return [batches[k:k + w] for k in range(0, len(batches), w)]
        order = (np.random.default_rng([self.seed, self.epoch, 0]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        total = -(-self.n // w) * w
        order = np.resize(order, total)  # wrap around: every rank the same length
        step = self.batch_size * w
        return [[order[k:k + step][r::w] for r in range(w)] for k in range(0, total, step)]  # interleaved

    def positions(self, skip: int | None = None) -> np.ndarray:
        """This rank's positions in the epoch's draw, in the order it trains on them, after the
        first `skip` items over all ranks (default: the epoch's skip)."""
        skip = self.skip if skip is None else skip
        mine, done = [], 0
        for batch in self.global_batches():
            if done >= skip:
                mine.append(batch[self.rank])
            done += sum(len(b) for b in batch)
        return np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)

    def batches_per_epoch(self) -> int:
        """Batches this rank trains in a whole epoch (skip ignored): the schedule counts these."""
        return -(-len(self.positions(skip=0)) // self.batch_size)

    def __iter__(self) -> Iterator[Sample]:
        # Partners for every position at once, from a generator of their own: the same on every rank.
        partners = self.draw[np.random.default_rng([self.seed, self.epoch, 1]).integers(self.n, size=(self.n, PARTNERS))]
        for p in self.positions().tolist():
            yield Sample(p, int(self.draw[p]), tuple(partners[p].tolist()), (self.seed, self.epoch, p))

    def __len__(self) -> int:
        if not self.whole_batches and not self.skip:  # no permutation needed to count
            return -(-self.n // self.world_size)
        return len(self.positions())
