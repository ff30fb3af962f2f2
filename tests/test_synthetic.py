"""Tests for the synthetic shapes dataset generator (trainer/data/synthetic.py)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from trainer.data import shapes
from trainer.data import synthetic as syn

SEED, N, IMGSZ = 3, 40, 96
LABEL_LINE = re.compile(r"^\d+ \d\.\d{6} \d\.\d{6} \d\.\d{6} \d\.\d{6}$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Four small datasets: A and B identical settings, C another seed, D more images."""
    root = tmp_path_factory.mktemp("synthetic")
    specs = {"a": (N, SEED), "b": (N, SEED), "c": (N, SEED + 1), "d": (60, SEED)}
    for key, (images, seed) in specs.items():
        syn.generate(root / key, images, seed, imgsz=IMGSZ)
    return {k: root / k for k in specs}


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _find(folder: Path, kind: str, stem: str, suffix: str) -> Path:
    hits = list((folder / kind).glob(f"*/{stem}{suffix}"))
    assert len(hits) == 1, f"{stem}{suffix} found {len(hits)} times under {folder / kind}"
    return hits[0]


def _read_labels(path: Path) -> np.ndarray:
    rows = [[float(v) for v in line.split()] for line in path.read_text().splitlines()]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def _images(folder: Path) -> list[tuple[str, Path, Path]]:
    """(split, image path, label path) for every image, sorted by name."""
    out = []
    for split in ("train", "val"):
        for img in sorted((folder / "images" / split).glob("*.jpg")):
            out.append((split, img, folder / "labels" / split / f"{img.stem}.txt"))
    return out


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(runs):
    a, b = _hashes(runs["a"]), _hashes(runs["b"])
    assert len(a) == 2 * N + 2  # jpg + txt per image, data.yaml, manifest.json
    assert a == b


def test_different_seed_differs(runs):
    a, c = _hashes(runs["a"]), _hashes(runs["c"])
    jpgs_a = {Path(k).name: v for k, v in a.items() if k.endswith(".jpg")}
    jpgs_c = {Path(k).name: v for k, v in c.items() if k.endswith(".jpg")}
    assert jpgs_a.keys() == jpgs_c.keys()
    assert all(jpgs_a[k] != jpgs_c[k] for k in jpgs_a)


def test_image_k_does_not_depend_on_n(runs):
    for k in range(N):
        stem = f"syn_{k:06d}"
        for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
            small = _find(runs["a"], kind, stem, suffix).read_bytes()
            large = _find(runs["d"], kind, stem, suffix).read_bytes()
            assert small == large, f"{stem}{suffix} differs between N=40 and N=60"


# --- labels ------------------------------------------------------------------------------------


def test_label_files_are_valid_yolo(runs):
    n_labels = 0
    for _, img_path, lab_path in _images(runs["d"]):
        text = lab_path.read_text()
        for line in text.splitlines():
            assert LABEL_LINE.match(line), f"{lab_path}: bad line {line!r}"
        lab = _read_labels(lab_path)
        n_labels += len(lab)
        cls, xywh = lab[:, 0], lab[:, 1:]
        assert np.all((cls >= 0) & (cls < len(shapes.CLASS_NAMES)) & (cls == cls.round()))
        assert np.all((xywh >= 0) & (xywh <= 1))
        assert np.all(xywh[:, 2:] > 0)
        # Boxes lie inside the image (clipped), up to the 6-decimal rounding.
        assert np.all(xywh[:, :2] - xywh[:, 2:] / 2 >= -1e-6)
        assert np.all(xywh[:, :2] + xywh[:, 2:] / 2 <= 1 + 1e-6)
        assert cv2.imread(str(img_path)) is not None
    assert n_labels > 60  # 60 images, 1-6 objects each


def test_labels_match_the_plan(runs):
    """The cheap plan-only API counts exactly the labels that rendering writes."""
    plan = shapes.plan_dataset(60, SEED, IMGSZ)
    for p, split in zip(plan.images, plan.splits):
        lab = _read_labels(runs["d"] / "labels" / split / f"{p.name}.txt")
        assert lab[:, 0].astype(int).tolist() == [o.cls for o in p.objects]
        img = cv2.imread(str(runs["d"] / "images" / split / f"{p.name}.jpg"))
        assert img.shape == (p.height, p.width, 3)


def _pixel_boxes(lab: np.ndarray, w: int, h: int) -> np.ndarray:
    """(n, 4) integer [x0, y0, x1, y1] from normalised labels."""
    cx, cy, bw, bh = lab[:, 1] * w, lab[:, 2] * h, lab[:, 3] * w, lab[:, 4] * h
    return np.round(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)).astype(int)


@pytest.mark.parametrize("run", ["a", "c"])
def test_boxes_tightly_enclose_drawn_shapes(runs, run):
    """Compare each JPEG with its object-free background: the box centre and every box edge
    touch the shape, and a ring just outside isolated boxes is background."""
    seed = SEED if run == "a" else SEED + 1
    isolated = 0
    for _, img_path, lab_path in _images(runs[run]):
        plan = shapes.plan_image(seed, int(img_path.stem[4:]), IMGSZ)
        bg = shapes.render_background(plan).astype(np.float32)
        img = cv2.imread(str(img_path)).astype(np.float32)
        diff = np.linalg.norm(img - bg, axis=2)  # (H, W) colour distance
        boxes = _pixel_boxes(_read_labels(lab_path), plan.width, plan.height)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            mx, my = (x0 + x1) // 2, (y0 + y1) // 2
            assert diff[my - 1 : my + 2, mx - 1 : mx + 2].mean() > 50, f"{img_path}: box {i} centre is background"
            others = np.delete(boxes, i, 0)
            m = 4  # skip boxes with a neighbour within 4 px: its pixels would leak into the strips
            near = (others[:, 0] < x1 + m) & (others[:, 2] > x0 - m) & (others[:, 1] < y1 + m) & (others[:, 3] > y0 - m)
            if near.any():
                continue
            isolated += 1
            edges = [diff[y0:y1, x0 : x0 + 2], diff[y0:y1, x1 - 2 : x1],
                     diff[y0 : y0 + 2, x0:x1], diff[y1 - 2 : y1, x0:x1]]  # 2-px strips inside each edge
            assert min(e.max() for e in edges) > 30, f"{img_path}: box {i} is looser than its shape"
            ring = [diff[y0:y1, max(x0 - 3, 0) : max(x0 - 1, 0)], diff[y0:y1, x1 + 1 : x1 + 3],
                    diff[max(y0 - 3, 0) : max(y0 - 1, 0), x0:x1], diff[y1 + 1 : y1 + 3, x0:x1]]
            ring_px = np.concatenate([r.ravel() for r in ring])
            if ring_px.size:
                assert ring_px.mean() < 35, f"{img_path}: box {i} cuts through its shape"
    assert isolated > 20


def test_objects_overlap_little(runs):
    for _, img_path, lab_path in _images(runs["d"]):
        b = _read_labels(lab_path)[:, 1:]
        xyxy = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)
        area = b[:, 2] * b[:, 3]
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                wh = np.clip(np.minimum(xyxy[i, 2:], xyxy[j, 2:]) - np.maximum(xyxy[i, :2], xyxy[j, :2]), 0, None)
                inter = wh[0] * wh[1]
                # Pixel boxes may exceed the planned IoU < 0.3 by anti-aliasing and rounding.
                assert inter / (area[i] + area[j] - inter) < 0.35, f"{img_path}: boxes {i} and {j} overlap"


def test_some_images_are_non_square(runs):
    shapes = {cv2.imread(str(p)).shape[:2] for _, p, _ in _images(runs["d"])}
    assert shapes <= {(96, 96), (72, 96), (96, 72)}
    assert len(shapes) >= 2


def test_smallest_image_size_draws_every_object(tmp_path):
    syn.generate(tmp_path, 8, 0, imgsz=32)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dropped_empty_objects"] == 0
    for _, _, lab_path in _images(tmp_path):
        lab = _read_labels(lab_path)
        assert np.all(lab[:, 3:] * 32 >= 2)  # >= 2 px wide and tall


# --- data YAML and manifest --------------------------------------------------------------------


def test_data_yaml_loads_and_points_at_the_splits(runs):
    yaml_path = runs["a"] / "data.yaml"
    text = yaml_path.read_text()
    assert text.startswith("# ")
    data = yaml.safe_load(text)
    assert data["path"] == "."
    assert data["names"] == dict(enumerate(shapes.CLASS_NAMES))
    assert data["nc"] == len(shapes.CLASS_NAMES)
    root = yaml_path.parent / data["path"]
    n_train = len(list((root / data["train"]).glob("*.jpg")))
    n_val = len(list((root / data["val"]).glob("*.jpg")))
    assert (n_train, n_val) == (30, 10)  # round(0.25 * 40) in val


def test_manifest_counts_match_label_files(runs):
    manifest = json.loads((runs["d"] / "manifest.json").read_text())
    assert manifest["generator"] == syn.GENERATOR and manifest["complete"] is True
    assert manifest["seed"] == SEED and manifest["images"] == 60
    assert manifest["rare_class"] == "hexagon" and manifest["confusable_with"] == "circle"
    total = np.zeros(6, int)
    for split in ("train", "val"):
        counts = np.zeros(6, int)
        files = sorted((runs["d"] / "labels" / split).glob("*.txt"))
        for f in files:
            counts += np.bincount(_read_labels(f)[:, 0].astype(int), minlength=6)
        info = manifest["splits"][split]
        assert info["images"] == len(files)
        assert list(info["class_counts"].values()) == counts.tolist()
        assert info["backgrounds"] == sum(f.read_text() == "" for f in files)
        total += counts
    freqs = np.array(list(manifest["class_frequencies"].values()))
    np.testing.assert_allclose(freqs, total / total.sum(), atol=1e-6)


# --- class balance and stratified split --------------------------------------------------------


def _rare(p: shapes.ImagePlan) -> int:
    return sum(o.cls == shapes.RARE_CLASS for o in p.objects)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_shares_are_imbalanced_as_designed(seed):
    plan = shapes.plan_dataset(400, seed, 256)
    counts = np.bincount([o.cls for p in plan.images for o in p.objects], minlength=6)
    shares = counts / counts.sum()
    assert np.all(np.diff(shares) < 0), f"shares not decreasing: {shares}"
    assert 0.01 < shares[shapes.RARE_CLASS] < 0.06
    assert 0.28 < shares[0] < 0.42
    # Most images hold no rare class: image weighting has something to up-weight.
    without = sum(_rare(p) == 0 for p in plan.images)
    assert without / 400 > 0.8
    backgrounds = [p.index for p in plan.images if not p.objects]
    assert backgrounds == list(range(31, 400, 32))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_val_gets_enough_rare_instances(seed):
    plan = shapes.plan_dataset(200, seed, 128)
    val = sum(_rare(p) for p, s in zip(plan.images, plan.splits) if s == "val")
    train = sum(_rare(p) for p, s in zip(plan.images, plan.splits) if s == "train")
    assert val >= shapes.MIN_VAL_RARE
    assert train >= val  # train keeps at least half
    assert plan.splits.count("val") == 50


def test_split_of_tiny_dataset_keeps_both_sides():
    plan = shapes.plan_dataset(4, 0, 64, val_fraction=0.9)
    assert sorted(plan.splits) == ["train", "val", "val", "val"]
    plan = shapes.plan_dataset(4, 0, 64, val_fraction=0.01)
    assert sorted(plan.splits) == ["train", "train", "train", "val"]


def test_assign_splits_prefers_rare_images_for_val():
    """Hand-built plans: 20 images, 4 hold the rare class; val (5 images) gets exactly 2 of them."""
    rare = shapes.ObjectPlan(shapes.RARE_CLASS, 10, 10, 8, 0, 0)
    common = shapes.ObjectPlan(0, 10, 10, 8, 0, 0)
    plans = [
        shapes.ImagePlan(0, k, 64, 64, split_key=k / 20, objects=(rare,) if k in (3, 7, 11, 15) else (common,))
        for k in range(20)
    ]
    splits = shapes.assign_splits(plans, 0.25)
    # target = min(max(ceil(0.25 * 4), 8), 4 // 2) = 2 rare instances: images 3 and 7 (lowest keys);
    # the other three val slots go to the rare-free images with the lowest keys: 0, 1, 2.
    assert [k for k, s in enumerate(splits) if s == "val"] == [0, 1, 2, 3, 7]


# --- command line and output folder ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["--images", "3", "--seed", "0"],
        ["--images", "x", "--seed", "0"],
        ["--images", "10", "--seed", "0", "--imgsz", "31"],
        ["--images", "10", "--seed", "0", "--val-fraction", "0"],
        ["--images", "10", "--seed", "0", "--val-fraction", "1"],
        ["--images", "10", "--seed", "0", "--val-fraction", "nan"],
        ["--images", "10"],
    ],
)
def test_bad_flags_exit_with_code_2(tmp_path, extra):
    with pytest.raises(SystemExit) as exc:
        syn.main(["--out", str(tmp_path / "out"), *extra])
    assert exc.value.code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"images": 3}, "images"), ({"imgsz": 16}, "imgsz"), ({"val_fraction": 1.0}, "val_fraction")],
)
def test_generate_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"images": 10, "seed": 0, "imgsz": 64, "val_fraction": 0.25, **kwargs}
    with pytest.raises(ValueError, match=message):
        syn.generate(tmp_path / "out", **args)


@pytest.mark.parametrize("manifest", [None, '{"generator": "someone-else"}', "not json"])
def test_refuses_to_overwrite_a_foreign_folder(tmp_path, capsys, manifest):
    (tmp_path / "keep.txt").write_text("precious")
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(syn.SyntheticOutputError, match="refusing to overwrite"):
        syn.generate(tmp_path, 8, 0, imgsz=64)
    assert syn.main(["--out", str(tmp_path), "--images", "8", "--seed", "0"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["keep.txt"] + (["manifest.json"] if manifest else []))


def test_refuses_a_file_as_output(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(syn.SyntheticOutputError, match="not a folder"):
        syn.generate(target, 8, 0, imgsz=64)


def test_rerun_replaces_own_output_without_stale_files(tmp_path):
    syn.generate(tmp_path / "out", 12, 5, imgsz=64)
    (tmp_path / "out" / "labels" / "train.cache").write_bytes(b"old cache")
    syn.generate(tmp_path / "out", 6, 5, imgsz=64)
    syn.generate(tmp_path / "fresh", 6, 5, imgsz=64)
    assert _hashes(tmp_path / "out") == _hashes(tmp_path / "fresh")


def test_existing_empty_folder_is_accepted(tmp_path):
    yaml_path = syn.generate(tmp_path, 4, 0, imgsz=64)
    assert yaml_path == tmp_path / "data.yaml"
    assert len(list(tmp_path.glob("images/*/*.jpg"))) == 4


def test_module_runs_as_a_script(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.data.synthetic", "--out", str(out), "--images", "6", "--seed", "2",
         "--imgsz", "64", "--val-fraction", "0.5"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 images (3 train, 3 val" in proc.stdout
    syn.generate(tmp_path / "api", 6, 2, imgsz=64, val_fraction=0.5)
    assert _hashes(out) == _hashes(tmp_path / "api")
    assert math.isclose(json.loads((out / "manifest.json").read_text())["val_fraction"], 0.5)
