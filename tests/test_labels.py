"""Label discovery and validation: every rejection reason, duplicates, backgrounds, orphans, the cache."""

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer.data import labels as L
from trainer.data.config import load_data_config, resolve_split
from trainer.data.labels import DatasetError, DatasetReport, label_path_for, scan_split

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COCO128 = SHARED / "datasets" / "coco128" / "coco128.yaml"


def _img(root: Path, name: str, hw=(20, 30), label: str | None = None) -> Path:
    p = root / "images" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(p), np.full((*hw, 3), 200, np.uint8))
    if label is not None:
        lp = label_path_for(p)
        lp.parent.mkdir(parents=True, exist_ok=True)
        lp.write_text(label)
    return p


def _scan(files, tmp_path, nc=5, **kw):
    return scan_split(files, nc, cache_dir=tmp_path / "cache", workers=2, **kw)


def test_label_path_for():
    assert label_path_for("/d/images/train/x.jpg") == Path("/d/labels/train/x.txt")
    # Only the last "images" component changes.
    assert label_path_for("/images/a/images/x.PNG") == Path("/images/a/labels/x.txt")
    assert label_path_for("/d/imgs/x.jpeg") == Path("/d/imgs/x.txt")  # no images/: beside the image
    assert label_path_for("/d/images.jpg") == Path("/d/images.txt")  # the file name is not a folder


def test_good_background_and_duplicates(tmp_path, caplog):
    a = _img(tmp_path, "a.jpg", (20, 30), "0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.1 0.1\n")
    b = _img(tmp_path, "b.png", (40, 10))  # no label file: background
    c = _img(tmp_path, "c.png", (12, 12), "\n  \n")  # empty label file: background
    d = _img(tmp_path, "d.png", (16, 16), "2 0.5 0.5 0.5 0.5\n2 0.5 0.5 0.5 0.5\n3 .1 .1 .1 .1\n2 0.5 0.5 0.5 0.5\n")
    with caplog.at_level(logging.WARNING, logger="trainer.data.labels"):
        entries, rep = _scan([a, b, c, d], tmp_path, names=list("abcde"), split="train")
    assert [e.img_path for e in entries] == [a, b, c, d]  # input order
    assert entries[0].shape_hw == (20, 30) and entries[1].shape_hw == (40, 10)
    want = np.array([[0, 0.5, 0.5, 0.2, 0.4], [1, 0.25, 0.75, 0.1, 0.1]], np.float32)
    np.testing.assert_array_equal(entries[0].labels, want)
    assert entries[0].labels.dtype == np.float32
    assert entries[1].labels.shape == (0, 5) and entries[2].labels.shape == (0, 5)
    np.testing.assert_array_equal(entries[3].labels[:, 0], [2, 3])
    assert rep.n_found == 4 and rep.n_kept == 4 and rep.n_background == 2 and rep.n_labels == 4
    assert rep.class_counts == [1, 1, 1, 1, 0]
    assert rep.duplicates == ((str(label_path_for(d)), 2, 2),)
    assert rep.rejected == ()
    assert rep.image_sizes == {
        "width": {"min": 10, "median": 14, "max": 30},
        "height": {"min": 12, "median": 18, "max": 40},
    }
    assert "d.txt" in caplog.text and "[2, 4]" in caplog.text
    json.dumps(rep.to_dict())  # JSON-ready
    s = rep.summary()
    assert "train: 4/4 images kept" in s and "2 background" in s and "classes without labels: e" in s


@pytest.mark.parametrize(
    "text, reason",
    [
        ("0 0.5 0.5 0.2\n", ":1: expected 5 fields [cls cx cy w h], got 4"),
        ("0 0.5 0.5 0.2 0.2 9\n", ":1: expected 5 fields [cls cx cy w h], got 6"),
        ("0 0.5 0.5 0.2 0.2\n0 0.5 abc 0.2 0.2\n", ":2: non-numeric field 'abc'"),
        ("0 0.5 nan 0.2 0.2\n", ":1: non-finite value"),
        ("0 0.5 inf 0.2 0.2\n", ":1: non-finite value"),
        ("1.5 0.5 0.5 0.2 0.2\n", ":1: class id 1.5 is not an integer"),
        ("-1 0.5 0.5 0.2 0.2\n", ":1: class id -1 < 0"),
        ("\n\n7 0.5 0.5 0.2 0.2\n", ":3: class id 7 >= nc 5"),
        ("0 1.01 0.5 0.2 0.2\n", ":1: coordinate cx=1.01 outside [0, 1]"),
        ("0 0.5 0.5 0.2 -0.1\n", ":1: coordinate h=-0.1 outside [0, 1]"),
        ("0 0.5 0.5 0 0.2\n", ":1: non-positive box size w=0 h=0.2"),
    ],
)
def test_malformed_line_rejects_image(tmp_path, caplog, text, reason):
    good = _img(tmp_path, "good.jpg", label="0 0.5 0.5 0.1 0.1\n")
    bad = _img(tmp_path, "bad.jpg", label=text)
    with caplog.at_level(logging.WARNING, logger="trainer.data.labels"):
        entries, rep = _scan([good, bad], tmp_path)
    assert [e.img_path for e in entries] == [good]
    ((path, got),) = rep.rejected
    assert path == str(bad) and got.startswith(f"{label_path_for(bad)}{reason}")
    assert rep.n_kept == 1 and rep.class_counts[0] == 1
    assert str(label_path_for(bad)) in caplog.text


def test_tolerance_clips_tiny_excursions(tmp_path):
    p = _img(tmp_path, "a.jpg", label="0 1.0000005 -0.0000005 0.2 0.2\n")
    (e,), _ = _scan([p], tmp_path)
    np.testing.assert_array_equal(e.labels, np.array([[0, 1, 0, 0.2, 0.2]], np.float32))


def test_image_checks(tmp_path):
    good = _img(tmp_path, "good.jpg")
    missing = tmp_path / "images/missing.jpg"
    empty = tmp_path / "images/empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp_path / "images/corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    small = _img(tmp_path, "small.png", (9, 40))
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated = tmp_path / "images/trunc.jpg"
    truncated.write_bytes(buf.tobytes()[: len(buf) // 2])
    assert cv2.imread(str(truncated)) is not None  # the reason the end marker is checked at all
    disguised = tmp_path / "images/trunc.png"  # a truncated JPEG under a PNG name
    disguised.write_bytes(buf.tobytes()[:-10])
    padded = tmp_path / "images/padded.jpg"  # complete JPEG + zero padding: kept
    padded.write_bytes(buf.tobytes() + b"\x00" * 7)
    files = [good, missing, empty, corrupt, small, truncated, disguised, padded]
    entries, rep = _scan(files, tmp_path)
    reasons = dict(rep.rejected)
    assert reasons[str(missing)] == "image file missing"
    assert "empty" in reasons[str(empty)]
    assert reasons[str(corrupt)] == "unreadable or corrupt image"
    assert reasons[str(small)].startswith("image too small (40x9 px")
    assert reasons[str(truncated)].startswith("truncated JPEG")
    assert reasons[str(disguised)].startswith("truncated JPEG")
    assert rep.n_found == 8 and [e.img_path for e in entries] == [good, padded]
    assert entries[1].shape_hw == (64, 64)


def test_no_survivor_raises_naming_split(tmp_path):
    bad = _img(tmp_path, "a.jpg", label="9 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match="split 'val'"):
        _scan([bad], tmp_path, split="val")
    with pytest.raises(DatasetError, match="no images"):
        _scan([], tmp_path, split="val")


def test_orphans(tmp_path):
    a = _img(tmp_path, "train/a.jpg", label="0 0.5 0.5 0.1 0.1\n")
    _img(tmp_path, "train/other.jpg", label="0 0.5 0.5 0.1 0.1\n")  # on disk, outside the split: no orphan
    (tmp_path / "labels/train/ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "labels/train/classes.txt").write_text("a\n")
    _, rep = _scan([a], tmp_path)
    assert rep.orphan_labels == (str(tmp_path / "labels/train/ghost.txt"),)


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    files = [_img(tmp_path, f"{k}.jpg", label="0 0.5 0.5 0.1 0.1\n") for k in range(3)]
    calls = []
    real = L.verify_image_label
    monkeypatch.setattr(L, "verify_image_label", lambda *a: calls.append(a[0]) or real(*a))
    e1, r1 = _scan(files, tmp_path)
    assert len(calls) == 3
    cache_files = list((tmp_path / "cache").glob("*.json"))
    assert len(cache_files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    assert not list((tmp_path / "labels").glob("*.json"))  # nothing written into the dataset
    e2, r2 = _scan(list(reversed(files)), tmp_path)  # same set, other order: same cache
    assert len(calls) == 3
    assert [e.img_path for e in e2] == list(reversed(files)) and r2.to_dict() == r1.to_dict()
    np.testing.assert_array_equal(e2[0].labels, e1[2].labels)
    # Touching a label file (new mtime) invalidates the cache.
    lp = label_path_for(files[1])
    st = lp.stat()
    os.utime(lp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    _scan(files, tmp_path)
    assert len(calls) == 6
    # A different nc is a different result, hence a miss.
    _scan(files, tmp_path, nc=4)
    assert len(calls) == 9


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path, caplog):
    files = [_img(tmp_path, "a.jpg", label="1 0.5 0.5 0.1 0.1\n")]
    _scan(files, tmp_path)
    (cache,) = (tmp_path / "cache").glob("*.json")
    cache.write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="trainer.data.labels"):
        (e,), _ = _scan(files, tmp_path)
    assert "unreadable" in caplog.text and str(cache) in caplog.text
    assert e.labels[0, 0] == 1
    json.loads(cache.read_text())  # rebuilt


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KFYOLO_CACHE", str(tmp_path / "envcache"))
    scan_split([_img(tmp_path, "a.jpg")], 1, workers=1)
    assert len(list((tmp_path / "envcache").glob("*.json"))) == 1


def test_coco128(tmp_path):
    if not COCO128.is_file():
        pytest.skip(f"shared dataset absent: {COCO128}")
    cfg = load_data_config(COCO128)
    entries, rep = scan_split(resolve_split(cfg.train), cfg.nc, cfg.names, cache_dir=tmp_path, split="train")
    assert isinstance(rep, DatasetReport)
    # Facts documented in shared/README.md.
    assert (rep.n_found, rep.n_kept, rep.n_background, rep.n_labels) == (128, 128, 2, 929)
    assert sum(c > 0 for c in rep.class_counts) == 71
    assert len(rep.orphan_labels) == 2 and rep.rejected == ()
