"""`YoloDataset`: a torch Dataset over a validated YOLO-format split.

`dataset[i]` → (img uint8 (3, H, W) RGB, targets float32 (n, 6) [0, cls, cx, cy, w, h] normalised
to the returned image, path, shapes). `shapes` is None for mosaic items, otherwise
`((h0, w0), ((rh, rw), (padw, padh)))`: original size, total resize ratio original → returned
image (before padding), and the left/top letterbox padding, so a box on the returned image maps
back to the original by `(x - padw) / rw`, `(y - padh) / rh`.

Training indexes the dataset with `Sample`s (trainer/data/epoch_sampler.py): the sampler carries
the epoch's weighted draw, the mosaic and mixup partners, and the seed of the item's augmentation
generator, so an item is a pure function of its `Sample`.

Indexed with a plain int (validation, direct use), item i is image i; with augmentation the mosaic
partners are drawn uniformly, from a numpy Generator the process owns. The main process seeds it with
`seed`; a DataLoader worker re-seeds it from (seed, the worker's torch seed), so workers never repeat
each other.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from trainer.data import augment as aug
from trainer.data.config import DataConfig, resolve_split
from trainer.data.epoch_sampler import PARTNERS, Sample
from trainer.data.image_cache import ImageCache, estimate_bytes, resized_hw
from trainer.data.labels import DatasetError, DatasetReport, LabelEntry, report_for_entries, scan_split

# YOLOv5 hyp.scratch augmentation defaults; keys missing from `hyp` fall back to these.
DEFAULT_HYP = {
    "hsv_h": 0.015,  # hue gain (fraction of the hue circle)
    "hsv_s": 0.7,
    "hsv_v": 0.4,
    "degrees": 0.0,
    "translate": 0.1,  # fraction of the image
    "scale": 0.5,  # gain range 1 +- scale
    "shear": 0.0,
    "perspective": 0.0,
    "flipud": 0.0,  # probabilities
    "fliplr": 0.5,
    "mosaic": 1.0,
    "mixup": 0.0,
}


class YoloDataset(Dataset):
    """Images and labels of one split, with YOLOv5 training augmentation or validation letterboxing.

    `shapes` holds the original image sizes as (n, 2) [h, w] (note: YOLOv5 stores [w, h]).
    """

    def __init__(
        self,
        img_files_or_entries: str | Path | Sequence[str | Path] | Sequence[LabelEntry],
        img_size: int = 640,
        batch_size: int = 16,
        augment: bool = False,
        hyp: Mapping[str, float] | None = None,
        rect: bool = False,
        stride: int = 32,
        pad: float = 0.0,
        nc: int | None = None,
        names: Sequence[str] | None = None,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        split: str = "split",
        workers: int | None = None,
    ):
        if nc is None and not names:
            raise ValueError("YoloDataset needs nc or names")
        self.names = tuple(names) if names else tuple(str(c) for c in range(nc))
        self.nc = nc if nc is not None else len(self.names)
        if len(self.names) != self.nc:
            raise ValueError(f"nc={self.nc} disagrees with {len(self.names)} names")
        if img_size % stride:
            raise ValueError(f"img_size {img_size} must be a multiple of stride {stride}")
        entries, self.report = self._entries(img_files_or_entries, cache_dir, split, workers)
        self.img_size, self.batch_size, self.stride, self.pad = img_size, batch_size, stride, pad
        self.augment, self.rect = augment, rect
        self.hyp = {**DEFAULT_HYP, **(dict(hyp) if hyp else {})}
        self.mosaic = augment and not rect  # rect batches need each image's own aspect ratio
        self.seed = seed
        self._rng: np.random.Generator = np.random.default_rng(seed)
        self._rng_owner = None  # (worker id, worker seed) the generator was seeded for
        self.cache: ImageCache | None = None  # see cache_images()
        self._set_entries(entries)
        self.batch_shapes: np.ndarray | None = None
        self.batch_index: np.ndarray | None = None
        if rect:
            self._make_rect_batches()

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str, **kwargs) -> YoloDataset:
        """Build the dataset of `split` ('train', 'val' or 'test') of a parsed data YAML."""
        entries = cfg.split(split)
        if not entries:
            raise DatasetError(f"{cfg.yaml_path or '<data dict>'}: split {split!r} is empty")
        kwargs.setdefault("names", cfg.names)
        kwargs.setdefault("nc", cfg.nc)
        files = resolve_split(entries)
        if not files:
            where = ", ".join(str(e) for e in (entries if isinstance(entries, (list, tuple)) else [entries]))
            raise DatasetError(f"{cfg.yaml_path or '<data dict>'}: split {split!r} ({where}) holds no images")
        return cls(files, split=split, **kwargs)

    def _entries(self, src, cache_dir, split, workers) -> tuple[list[LabelEntry], DatasetReport]:
        if isinstance(src, (str, Path)):
            src = resolve_split(src)
        src = list(src)
        if src and all(isinstance(e, LabelEntry) for e in src):
            return list(src), report_for_entries(src, self.nc, self.names, split)
        return scan_split(src, self.nc, self.names, cache_dir=cache_dir, workers=workers, split=split)

    def _set_entries(self, entries: Sequence[LabelEntry]) -> None:
        self.entries = list(entries)
        self.img_files = [str(e.img_path) for e in self.entries]
        self.labels = [e.labels for e in self.entries]  # each (n, 5) [cls, cx, cy, w, h] normalised
        self.shapes = np.array([e.shape_hw for e in self.entries], dtype=np.int64).reshape(-1, 2)  # [h, w]
        self.n = len(self.entries)

    def _make_rect_batches(self) -> None:
        """Sort by aspect ratio h/w and give each batch the smallest stride-multiple shape that fits."""
        ar = self.shapes[:, 0] / self.shapes[:, 1]
        order = np.argsort(ar, kind="stable")
        self._set_entries([self.entries[k] for k in order])
        ar = ar[order]
        bi = np.arange(self.n) // self.batch_size  # batch of each (sorted) image
        nb = int(bi[-1]) + 1
        shapes = np.ones((nb, 2))  # (nb, 2) [h, w] relative to img_size
        for b in range(nb):
            lo, hi = ar[bi == b].min(), ar[bi == b].max()
            if hi < 1:  # all landscape: full width, height of the tallest
                shapes[b] = [hi, 1]
            elif lo > 1:  # all portrait: full height, width of the widest
                shapes[b] = [1, 1 / lo]
        self.batch_shapes = np.ceil(shapes * self.img_size / self.stride + self.pad).astype(np.int64) * self.stride
        self.batch_index = bi

    def __len__(self) -> int:
        return self.n

    # ------------------------------------------------------------ randomness

    @property
    def rng(self) -> np.random.Generator:
        """This process's generator (re-seeded once per DataLoader worker)."""
        info = get_worker_info()
        owner = None if info is None else (info.id, info.seed)
        if owner != self._rng_owner:
            seed = [self.seed, info.seed % 2**63] if info else self.seed
            self._rng = np.random.default_rng(seed)
            self._rng_owner = owner
        return self._rng

    # ------------------------------------------------------------ loading

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image i (dataset order) as BGR, long side resized to img_size → (img, (h0, w0), (h, w)).
        A copy from the RAM cache when there is one (cache_images), otherwise read from its file."""
        if self.cache is not None:
            return self.cache.get(i)
        return self._read_image(i)

    def _read_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        path = self.img_files[i]
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise DatasetError(f"{path}: image became unreadable after the dataset was scanned")
        h0, w0 = img.shape[:2]
        h, w = resized_hw(h0, w0, self.img_size)
        if (h, w) != (h0, w0):
            # INTER_AREA gives the least aliasing when shrinking for evaluation; training uses the
            # faster INTER_LINEAR since augmentation resamples anyway.
            # The short side rounds *up*, as YOLOv5 does: the official weights' published scores come
            # from that pixel grid (rounding to nearest cost 0.005 AP at 480 px on COCO val images,
            # bench/bench_vs_yolov5.py). The long side is img_size exactly.
            interp = cv2.INTER_AREA if max(h, w) < max(h0, w0) and not self.augment else cv2.INTER_LINEAR
            img = cv2.resize(img, (w, h), interpolation=interp)
        return img, (h0, w0), img.shape[:2]

    def cache_bytes(self) -> int:
        """Estimated RAM of cache_images(), from the sizes the scan recorded."""
        return estimate_bytes(self.shapes, self.img_size)

    def cache_images(self, threads: int = 1) -> ImageCache:
        """Decode and resize every image once into RAM; later load_image calls copy from there. Call it
        in the main process before a DataLoader forks its workers, which then share the pages."""
        if self.cache is None:
            self.cache = ImageCache.build(self._read_image, self.n, threads)
        return self.cache

    def __getitem__(self, index: int | Sample):
        if isinstance(index, Sample):
            position, i, partners = index.position, index.image, list(index.partners)
            rng = np.random.default_rng(index.seed) if self.augment else None
        else:
            position = i = int(index)
            rng = self.rng if self.augment else None
            partners = rng.integers(self.n, size=PARTNERS).tolist() if self.mosaic else []
        hyp = self.hyp
        if self.mosaic and rng.random() < hyp["mosaic"]:
            img, targets = self._load_mosaic([i] + partners[:3], rng)
            shapes = None
            if hyp["mixup"] and rng.random() < hyp["mixup"]:
                img, targets = aug.mixup(img, targets, *self._load_mosaic(partners[3:7], rng), rng)
        else:
            img, targets, shapes = self._load_letterboxed(position, i, rng)
        h, w = img.shape[:2]
        labels = aug.xyxy_to_cxcywhn(targets, w, h)  # (n, 5) [cls, cx, cy, w, h] normalised
        if self.augment:
            aug.augment_hsv(img, hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"], rng)
            if rng.random() < hyp["flipud"]:
                img, labels = aug.vflip(img, labels)
            if rng.random() < hyp["fliplr"]:
                img, labels = aug.hflip(img, labels)
        out = torch.zeros((len(labels), 6), dtype=torch.float32)  # (n, 6) [img, cls, cx, cy, w, h]
        out[:, 1:] = torch.from_numpy(labels)
        chw = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC → RGB CHW
        return torch.from_numpy(chw), out, self.img_files[i], shapes

    def _load_letterboxed(self, position: int, i: int, rng: np.random.Generator | None):
        """Letterbox image i to img_size, or to its batch's shape with rect; then perspective if training."""
        img, (h0, w0), (h, w) = self.load_image(i)
        # With rect, the shape follows the batch *position* so a sampled batch always stacks.
        shape = tuple(self.batch_shapes[self.batch_index[position]]) if self.rect else self.img_size
        img, (rw, rh), pad = aug.letterbox(img, shape, auto=False, scaleup=self.augment, stride=self.stride)
        shapes = ((h0, w0), ((h * rh / h0, w * rw / w0), pad))
        targets = aug.cxcywhn_to_xyxy(self.labels[i], w * rw, h * rh, pad[0], pad[1])  # (n, 5) px
        if self.augment:
            p = self.hyp
            img, targets = aug.random_perspective(
                img, targets, p["degrees"], p["translate"], p["scale"], p["shear"], p["perspective"], rng=rng
            )
        return img, targets, shapes

    def _load_mosaic(self, picks: list[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Mosaic of the 4 images `picks` → (s x s img, (n, 5) px)."""
        imgs = [self.load_image(k)[0] for k in picks]
        p = self.hyp
        return aug.mosaic4(
            imgs, [self.labels[k] for k in picks], self.img_size, rng,
            p["degrees"], p["translate"], p["scale"], p["shear"], p["perspective"],
        )  # fmt: skip

    @staticmethod
    def collate_fn(batch):
        """Stack items → (imgs (B, 3, H, W) uint8, targets (N, 6) [img, cls, cx, cy, w, h], paths, shapes)."""
        imgs, targets, paths, shapes = zip(*batch)
        targets = [t.clone() for t in targets]
        for k, t in enumerate(targets):
            t[:, 0] = k  # which image of the batch each box belongs to
        return torch.stack(imgs, 0), torch.cat(targets, 0), paths, shapes


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed numpy's and Python's global RNGs from torch's worker seed.
    Workers ignore SIGINT: Ctrl-C reaches the whole process group, and a worker that died of it
    would fail the loader while the training process finishes its step and saves
    (trainer/preempt.py). SIGTERM keeps its default: it is how the loader ends its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def single_threaded_opencv() -> None:
    """Call in the main process before a DataLoader starts workers: they inherit one OpenCV thread.
    The workers are the parallelism, and OpenCV's own thread pool in each would fight the training
    threads for the same cores. It must happen before the fork: a worker that reconfigures a pool
    its parent had started deadlocks on the pool's threads, which the fork did not copy."""
    cv2.setNumThreads(1)
