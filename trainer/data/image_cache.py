"""Decoded images held in RAM, so an epoch does not decode every JPEG again.

A mosaic reads 4 images, and decoding them is most of the loader's work: on COCO128 at 320 px one
loader process makes 95 mosaics/s from the files and 695/s from cached pixels (2 cores). With
2 workers beside 2 training threads, that decoding is CPU taken from the training step.

`--cache` decides:
- `ram` caches the split;
- `off` never does;
- `auto` (the default) caches when the resized images of the train and val splits together fit in
  a quarter of the memory available to this rank: the smaller of the host's MemAvailable and the
  cgroup's (a pod's) limit, shared by the ranks on the node.

The cache holds each image as `load_image` returns it: BGR, long side resized to the split's
img_size, with the split's interpolation. Items are therefore byte-identical with and without it.
It is filled by a thread pool in the main process before the DataLoader forks its workers: the
workers read the parent's pages, which are never written, so they are shared and not copied.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "ram", "off")
AUTO_FRACTION = 0.25  # of the memory available to a rank


def resized_hw(h0: int, w0: int, img_size: int) -> tuple[int, int]:
    """Size `load_image` gives an (h0, w0) image: long side img_size, short side rounded up."""
    r = img_size / max(h0, w0)
    if r == 1:
        return h0, w0
    return tuple(min(img_size, max(1, math.ceil(v * r - 1e-9))) for v in (h0, w0))  # type: ignore[return-value]


def estimate_bytes(shapes_hw: Sequence[Sequence[int]] | np.ndarray, img_size: int) -> int:
    """Bytes of a split's cached 3-channel images, from the sizes the scan recorded."""
    total = 0
    for h0, w0 in shapes_hw:
        h, w = resized_hw(int(h0), int(w0), img_size)
        total += h * w * 3
    return total


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # "max" means no limit


def available_memory() -> int:
    """Bytes this process can still allocate: min(MemAvailable, cgroup limit - usage)."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # cgroup v1
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and limit < 1 << 60:  # v1 reports "no limit" as a huge number
            candidates.append(max(0, limit - (usage or 0)))
    if not candidates:
        try:
            import os

            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 0
    return min(candidates)


@dataclass(frozen=True)
class CacheDecision:
    cache: bool
    need: int  # bytes
    budget: int  # bytes; 0 when the mode is not auto
    reason: str


def decide(mode: str, need: int, local_world_size: int = 1, available: int | None = None) -> CacheDecision:
    """Whether to cache `need` bytes under `mode` (auto, ram or off)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    mb = need / 2**20
    if mode == "off":
        return CacheDecision(False, need, 0, "--cache off: images are decoded from the files every epoch")
    if mode == "ram":
        return CacheDecision(True, need, 0, f"--cache ram: {mb:.0f} MB of decoded images in RAM")
    available = available_memory() if available is None else available
    budget = int(available * AUTO_FRACTION / max(1, local_world_size))
    if need <= budget:
        return CacheDecision(True, need, budget, f"--cache auto: {mb:.0f} MB of decoded images in RAM "
                             f"(within this rank's budget of {budget / 2**20:.0f} MB)")
    return CacheDecision(False, need, budget, f"--cache auto: the decoded images need {mb:.0f} MB, over this "
                         f"rank's budget of {budget / 2**20:.0f} MB (a quarter of the memory available, shared "
                         "by the node's ranks); images are decoded every epoch. --cache ram forces the cache")


class ImageCache:
    """Image i of a split as `load(i)` gave it: (BGR uint8 (h, w, 3), (h0, w0))."""

    def __init__(self, images: list[np.ndarray], original_hw: list[tuple[int, int]]):
        if len(images) != len(original_hw):
            raise ValueError("one original size per image")
        for img in images:
            img.flags.writeable = False  # shared with forked workers: a write would be a bug
        self.images, self.original_hw = images, original_hw

    @classmethod
    def build(cls, load: Callable[[int], tuple[np.ndarray, tuple[int, int], tuple[int, int]]], n: int,
              threads: int = 1) -> ImageCache:
        """Fill the cache by calling `load(i)` for i in range(n) on `threads` threads (OpenCV releases
        the GIL while it decodes and resizes). The first failure propagates, naming its file."""
        with ThreadPoolExecutor(max(1, threads)) as pool:
            loaded = list(pool.map(load, range(n)))
        return cls([img for img, _, _ in loaded], [hw0 for _, hw0, _ in loaded])

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return sum(img.nbytes for img in self.images)

    def get(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """A writable copy of image i, its original (h0, w0) and its cached (h, w)."""
        img = self.images[i]
        return img.copy(), self.original_hw[i], img.shape[:2]
