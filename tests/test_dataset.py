"""YoloDataset on tiny generated images (img_size 64): layout, targets, rect batches, samples, workers."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from trainer.data.config import load_data_config
from trainer.data.dataset import YoloDataset, seed_worker
from trainer.data.epoch_sampler import EpochSampler
from trainer.data.labels import scan_split

NO_AUG = {k: 0.0 for k in ("hsv_h", "hsv_s", "hsv_v", "translate", "scale", "fliplr", "mosaic")}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # loader workers fork: no thread pools to copy


def _write(root: Path, name: str, hw, bgr=(30, 60, 90), labels=None) -> Path:
    p = root / "images" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(p), np.full((*hw, 3), bgr, np.uint8))
    if labels is not None:
        lp = root / "labels" / Path(name).with_suffix(".txt")
        lp.parent.mkdir(parents=True, exist_ok=True)
        lp.write_text("".join(" ".join(f"{v:g}" for v in row) + "\n" for row in labels))
    return p


def _ds(files, tmp_path, **kw):
    kw.setdefault("nc", 8)
    return YoloDataset(files, img_size=64, cache_dir=tmp_path / "cache", workers=1, **kw)


@pytest.fixture
def five(tmp_path):
    """Five PNGs of different aspect ratios; image k holds one box of class k."""
    hws = [(40, 30), (16, 64), (40, 40), (40, 20), (16, 40)]  # aspect h/w: 1.33 .25 1 2 .4
    return [_write(tmp_path, f"{k}.png", hw, labels=[[k, 0.5, 0.5, 0.5, 0.5]]) for k, hw in enumerate(hws)]


def test_layout_dtype_and_rgb_order(tmp_path):
    p = _write(tmp_path, "blue.png", (32, 64), bgr=(255, 0, 0), labels=[[1, 0.25, 0.25, 0.5, 0.5]])
    ds = _ds([p], tmp_path)
    img, t, path, shapes = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64) and img.is_contiguous()
    assert path == str(p) and ds.n == 1 and len(ds) == 1 and ds.img_files == [str(p)]
    assert ds.shapes.tolist() == [[32, 64]]  # original [h, w]
    # Blue in BGR is (0, 0, 255) in RGB; the letterbox bands are grey.
    assert img[:, 16:48].reshape(3, -1).float().mean(1).tolist() == [0, 0, 255]
    assert (img[:, :16] == 114).all()
    # 64x32 image letterboxed to 64x64: 16 rows of padding on top.
    assert t.dtype == torch.float32 and t.shape == (1, 6)
    torch.testing.assert_close(t, torch.tensor([[0, 1, 0.25, 0.375, 0.5, 0.25]]))
    assert shapes == ((32, 64), ((1.0, 1.0), (0.0, 16.0)))


def test_targets_after_resize_and_shapes_map_back(tmp_path):
    p = _write(tmp_path, "tall.jpg", (128, 64), labels=[[2, 0.5, 0.25, 0.5, 0.5]])
    ds = _ds([p], tmp_path)
    img0, (h0, w0), (h, w) = ds.load_image(0)
    assert (h0, w0, h, w) == (128, 64, 64, 32) and img0.shape == (64, 32, 3)
    img, t, _, shapes = ds[0]
    # Resized to 32x64 (w x h), then 16 columns of padding on the left.
    torch.testing.assert_close(t[0, 1:], torch.tensor([2, 0.5, 0.25, 0.25, 0.5]))
    (oh, ow), ((rh, rw), (padw, padh)) = shapes
    assert (oh, ow, rh, rw, padw, padh) == (128, 64, 0.5, 0.5, 16.0, 0.0)
    # The box's left edge on the returned image maps back to the original x = 0.25 * 64 = 16.
    x1 = (t[0, 2] - t[0, 4] / 2) * img.shape[2]
    assert ((x1 - padw) / rw).item() == pytest.approx(16.0)


def test_background_image(tmp_path):
    a = _write(tmp_path, "a.png", (20, 20), labels=[[0, 0.5, 0.5, 0.2, 0.2]])
    b = _write(tmp_path, "b.png", (20, 20))  # no label file
    ds = _ds([a, b], tmp_path)
    assert ds.report.n_background == 1 and ds.labels[1].shape == (0, 5)
    _, t, _, _ = ds[1]
    assert t.shape == (0, 6)
    imgs, targets, paths, shapes = YoloDataset.collate_fn([ds[1], ds[0], ds[1]])
    assert imgs.shape == (3, 3, 64, 64)
    torch.testing.assert_close(targets, torch.tensor([[1, 0, 0.5, 0.5, 0.2, 0.2]]))


def test_collate_fills_batch_index(five, tmp_path):
    ds = _ds(five, tmp_path)
    items = [ds[k] for k in (0, 1, 1)]
    imgs, targets, paths, shapes = YoloDataset.collate_fn(items)
    assert imgs.dtype == torch.uint8 and imgs.shape == (3, 3, 64, 64)
    assert targets[:, 0].tolist() == [0, 1, 2] and targets[:, 1].tolist() == [0, 1, 1]
    assert paths == (str(five[0]), str(five[1]), str(five[1])) and len(shapes) == 3
    assert items[0][1][0, 0] == 0 and items[2][1][0, 0] == 0  # the items themselves are untouched


@pytest.mark.parametrize("pad, want", [(0.0, [[32, 64], [64, 64], [64, 32]]), (0.5, [[64, 96], [96, 96], [96, 64]])])
def test_rect_batches(five, tmp_path, pad, want):
    ds = _ds(five, tmp_path, rect=True, batch_size=2, pad=pad)
    # Sorted by h/w: .25 (1), .4 (4), 1 (2), 1.33 (0), 2 (3).
    assert ds.img_files == [str(five[k]) for k in (1, 4, 2, 0, 3)]
    assert [int(lab[0, 0]) for lab in ds.labels] == [1, 4, 2, 0, 3]
    assert ds.shapes.tolist() == [[16, 64], [16, 40], [40, 40], [40, 30], [40, 20]]
    assert ds.batch_index.tolist() == [0, 0, 1, 1, 2]
    # Landscape batch: [max h/w, 1] = [.4, 1]; mixed: [1, 1]; portrait: [1, 1/min h/w] = [1, .5].
    rel = np.array([[0.4, 1], [1, 1], [1, 0.5]])
    np.testing.assert_array_equal(ds.batch_shapes, np.ceil(rel * 64 / 32 + pad) * 32)
    assert ds.batch_shapes.tolist() == want and (ds.batch_shapes % 32 == 0).all()
    for k in range(ds.n):
        img, t, _, _ = ds[k]
        assert list(img.shape[1:]) == want[ds.batch_index[k]]
        assert t[0, 1] == ds.labels[k][0, 0]
    assert not ds.mosaic
    imgs, *_ = YoloDataset.collate_fn([ds[2], ds[3]])
    assert imgs.shape == (2, 3, *want[1])


def test_samples_carry_the_draw_and_mosaic_partners(five, tmp_path):
    ds = _ds(five, tmp_path)
    sampler = EpochSampler(ds.n, batch_size=2, seed=3)
    sampler.set_epoch(0, [2] * ds.n)
    assert {ds[s][2] for s in sampler} == {str(five[2])}
    aug = _ds(five, tmp_path, augment=True, hyp={"mosaic": 1.0, "scale": 0.0, "translate": 0.0}, seed=1)
    classes = set()
    for s in sampler:
        assert s.partners == (2,) * 7  # partners come from the same draw
        img, t, path, shapes = aug[s]
        assert shapes is None and img.shape == (3, 64, 64) and path == str(five[2])
        classes |= set(t[:, 1].tolist())
    assert classes == {2.0}  # every mosaic tile was image 2


def test_an_item_is_a_function_of_its_sample(five, tmp_path):
    """Same Sample, same item, whichever dataset object or process builds it (workers may persist)."""
    hyp = {"mosaic": 1.0, "degrees": 5.0}
    a, b = (_ds(five, tmp_path, augment=True, hyp=hyp) for _ in range(2))
    sampler = EpochSampler(a.n, batch_size=2, seed=5)
    sampler.set_epoch(4)
    samples = list(sampler)
    first = [a[s] for s in samples]
    b[samples[0]]  # b has served another item first: no state carries over
    for s, x in zip(reversed(samples), reversed(first)):
        y = b[s]
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    sampler.set_epoch(5)
    other = [a[s] for s in sampler]
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(first, other))  # a new epoch, new augmentation


def test_augment_determinism_and_mosaic_switch(five, tmp_path):
    def run(seed, mosaic):
        ds = _ds(five, tmp_path, augment=True, seed=seed, hyp={"mosaic": mosaic, "degrees": 5.0})
        return [ds[k] for k in range(ds.n)]

    a, b, c = run(0, 1.0), run(0, 1.0), run(1, 1.0)
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert any(not torch.equal(x[0], y[0]) or not torch.equal(x[1], y[1]) for x, y in zip(a, c))
    assert all(item[3] is None for item in a)  # mosaic: no shapes
    off = run(0, 0.0)
    assert all(item[3] is not None and item[0].shape == (3, 64, 64) for item in off)
    for img, t, _, _ in a + off:
        assert ((t[:, 2:] >= 0) & (t[:, 2:] <= 1)).all()


def test_no_augmentation_hyp_matches_validation(five, tmp_path):
    val, train = _ds(five, tmp_path), _ds(five, tmp_path, augment=True, hyp=NO_AUG)
    for k in range(val.n):
        assert torch.equal(val[k][0], train[k][0]) and torch.allclose(val[k][1], train[k][1])


def test_from_config_and_prescanned_entries(five, tmp_path):
    y = tmp_path / "d.yaml"
    y.write_text(yaml.safe_dump({"train": "images", "val": "images", "names": [f"c{k}" for k in range(5)]}))
    ds = YoloDataset.from_config(load_data_config(y), "val", img_size=64, cache_dir=tmp_path / "c")
    assert ds.n == 5 and ds.nc == 5 and ds.report.split == "val" and ds.names[4] == "c4"
    entries, _ = scan_split(five, 5, cache_dir=tmp_path / "c")
    ds2 = YoloDataset(entries, img_size=64, nc=5)
    assert ds2.img_files == ds.img_files and ds2.report.n_labels == 5
    with pytest.raises(ValueError, match="multiple of stride"):
        YoloDataset(entries, img_size=60, nc=5)


def test_dataloader_two_workers(five, tmp_path):
    torch.manual_seed(0)
    ds = _ds(five, tmp_path, augment=True, hyp={"mosaic": 1.0})
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=YoloDataset.collate_fn, worker_init_fn=seed_worker)
    batches = list(loader)
    assert len(batches) == 3  # 5 images → batches of 2, 2, 1
    imgs = torch.cat([b[0] for b in batches])
    assert imgs.shape == (5, 3, 64, 64)
    # Workers must not replay each other's random stream.
    assert len({bytes(i.numpy()) for i in imgs}) == 5


def test_persistent_workers_follow_each_epochs_draw(five, tmp_path):
    """Workers forked once still build every epoch from that epoch's draw, and the items equal the
    ones the main process builds from the same Samples (worker count does not matter)."""
    ds = _ds(five, tmp_path, augment=True, hyp={"mosaic": 0.0, "scale": 0.0, "translate": 0.0, "fliplr": 0.0})
    sampler = EpochSampler(ds.n, batch_size=2, seed=1)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, persistent_workers=True,
                        collate_fn=YoloDataset.collate_fn)
    for epoch, image in enumerate([0, 3, 1]):
        sampler.set_epoch(epoch, [image] * ds.n)
        paths = [p for batch in loader for p in batch[2]]
        assert paths == [str(five[image])] * ds.n
    sampler.set_epoch(7)
    in_workers = torch.cat([b[0] for b in loader])
    in_main = torch.stack([ds[s][0] for s in sampler])
    assert torch.equal(in_workers, in_main)
