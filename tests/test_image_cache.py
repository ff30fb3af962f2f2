"""The RAM image cache (trainer/data/image_cache.py): items byte-identical with and without it, the
size estimate, the auto budget, read-only sharing with forked workers, and a file gone after the scan."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from trainer.config import ConfigError, TrainOptions
from trainer.data import image_cache
from trainer.data.dataset import YoloDataset
from trainer.data.epoch_sampler import EpochSampler
from trainer.data.image_cache import ImageCache, decide, estimate_bytes, resized_hw
from trainer.data.labels import DatasetError

# Sizes that exercise the rounding: shrinking, enlarging, exact, and a 1-pixel short side.
SHAPES = [(47, 93), (16, 64), (64, 64), (97, 31), (10, 700), (20, 13)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # loader workers fork: no thread pools to copy


@pytest.fixture
def noisy(tmp_path) -> list[Path]:
    """PNGs of random pixels (lossless, so any resampling difference shows), one box each."""
    rng = np.random.default_rng(0)
    files = []
    for k, hw in enumerate(SHAPES):
        p = tmp_path / "images" / f"{k}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        lp = tmp_path / "labels" / f"{k}.txt"
        lp.parent.mkdir(parents=True, exist_ok=True)
        lp.write_text(f"{k % 3} 0.5 0.5 0.4 0.6\n")
        files.append(p)
    return files


def _ds(files, tmp_path, **kw):
    return YoloDataset(files, img_size=64, nc=3, cache_dir=tmp_path / "labels-cache", workers=1, **kw)


def test_resized_hw_is_what_load_image_returns(noisy, tmp_path):
    for augment in (False, True):  # the two interpolations
        ds = _ds(noisy, tmp_path, augment=augment)
        for i, (h0, w0) in enumerate(SHAPES):
            img, hw0, hw = ds.load_image(i)
            assert hw0 == (h0, w0) and hw == img.shape[:2] == resized_hw(h0, w0, 64)
            assert max(hw) == 64
    assert resized_hw(10, 700, 64) == (1, 64)  # 0.91 rounds up to one row, never to zero
    assert resized_hw(64, 64, 64) == (64, 64)


def test_estimate_matches_the_filled_cache(noisy, tmp_path):
    ds = _ds(noisy, tmp_path)
    assert ds.cache_bytes() == estimate_bytes(SHAPES, 64)
    cache = ds.cache_images(threads=2)
    assert cache.nbytes == ds.cache_bytes() and len(cache) == ds.n
    assert ds.cache_images() is cache  # filled once
    assert estimate_bytes([], 64) == 0


@pytest.mark.parametrize("augment", [False, True])
def test_items_are_byte_identical_with_the_cache(noisy, tmp_path, augment):
    hyp = {"mosaic": 0.5, "mixup": 0.5} if augment else None
    plain, cached = _ds(noisy, tmp_path, augment=augment, hyp=hyp), _ds(noisy, tmp_path, augment=augment, hyp=hyp)
    cached.cache_images(threads=2)
    if augment:
        sampler = EpochSampler(plain.n, batch_size=2, seed=3)
        sampler.set_epoch(1)
        keys = list(sampler)
    else:
        keys = range(plain.n)
    for key in keys:
        a, b = plain[key], cached[key]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]


def test_cached_pixels_are_read_only_and_copies_are_not(noisy, tmp_path):
    ds = _ds(noisy, tmp_path)
    ds.cache_images()
    before = ds.cache.images[0].copy()
    with pytest.raises(ValueError):
        ds.cache.images[0][0, 0, 0] = 1
    img, _, _ = ds.load_image(0)
    img[:] = 0  # augmentation works in place on what load_image returns
    assert np.array_equal(ds.cache.images[0], before)


def test_forked_workers_read_the_parents_cache(noisy, tmp_path):
    """Filled before the fork, then the files are deleted: workers can only have read the cache."""
    ds = _ds(noisy, tmp_path, augment=True, hyp={"mosaic": 1.0})
    sampler = EpochSampler(ds.n, batch_size=2, seed=1)
    sampler.set_epoch(0)
    want = torch.stack([ds[s][0] for s in sampler])
    ds.cache_images()
    for p in noisy:
        p.unlink()
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, collate_fn=YoloDataset.collate_fn)
    assert torch.equal(torch.cat([b[0] for b in loader]), want)


def test_an_image_gone_after_the_scan_names_its_file(noisy, tmp_path):
    ds = _ds(noisy, tmp_path)
    noisy[2].write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"2\.png: image became unreadable"):
        ds.cache_images(threads=2)
    assert ds.cache is None  # nothing half-filled is used


def test_decide_modes_and_the_auto_budget():
    gib = 2**30
    assert decide("off", 1, available=100 * gib).cache is False
    assert decide("ram", 100 * gib, available=gib).cache is True  # forced, whatever the budget
    yes = decide("auto", gib, available=8 * gib)  # a quarter of 8 GiB is 2 GiB
    assert yes.cache and yes.budget == 2 * gib and "1024 MB" in yes.reason
    no = decide("auto", 3 * gib, available=8 * gib)
    assert not no.cache and "--cache ram forces" in no.reason
    shared = decide("auto", gib, local_world_size=4, available=8 * gib)  # 512 MiB per rank
    assert not shared.cache and shared.budget == gib // 2
    assert decide("auto", 0, available=0).cache  # nothing to cache always fits
    with pytest.raises(ValueError, match="--cache must be one of auto, ram, off"):
        decide("disk", 1)


def test_available_memory_reads_this_machine():
    got = image_cache.available_memory()
    assert 0 < got < 2**50


def test_cgroup_limit_caps_available_memory(tmp_path, monkeypatch):
    """A pod's limit wins over the host's MemAvailable: limit - usage."""
    files = {"/proc/meminfo": "MemTotal: 100000000 kB\nMemAvailable:   90000000 kB\n",
             "/sys/fs/cgroup/memory.max": f"{4 * 2**30}\n", "/sys/fs/cgroup/memory.current": f"{2**30}\n"}
    real = Path.read_text

    def fake(self, *a, **kw):
        if str(self) in files:
            return files[str(self)]
        if str(self).startswith("/sys/fs/cgroup"):
            raise FileNotFoundError(self)
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", fake)
    assert image_cache.available_memory() == 3 * 2**30
    files["/sys/fs/cgroup/memory.max"] = "max\n"  # no limit: the host's figure
    assert image_cache.available_memory() == 90000000 * 1024


def test_cache_flag_is_checked():
    assert TrainOptions(data="d.yaml").cache == "auto"
    with pytest.raises(ConfigError, match="--cache must be one of auto, ram, off, got 'disk'"):
        TrainOptions(data="d.yaml", cache="disk")


def test_image_cache_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        ImageCache([np.zeros((2, 2, 3), np.uint8)], [])
