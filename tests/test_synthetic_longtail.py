"""Tests for the long-tail kind of the synthetic shapes dataset (trainer/data/longtail.py).

Label counts for large N come from the plan functions (no pixels); only small datasets are rendered.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from trainer.data import longtail as lt
from trainer.data import shapes
from trainer.data import synthetic as syn

SEED, N, IMGSZ = 4, 40, 64
NEW_SHAPES = ("diamond", "ring", "arrow", "heart")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Rendered long-tail datasets: A and B identical settings, D more images, E the default kind."""
    root = tmp_path_factory.mktemp("longtail")
    specs = {"a": (N, True), "b": (N, True), "d": (70, True), "e": (N, False)}
    for key, (images, long_tail) in specs.items():
        syn.generate(root / key, images, SEED, imgsz=IMGSZ, long_tail=long_tail)
    return {k: root / k for k in specs}


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _counts(plan: shapes.DatasetPlan, split: str) -> np.ndarray:
    """(C,) label count of each long-tail class in `split`."""
    cls = [o.cls for p, s in zip(plan.images, plan.splits) if s == split for o in p.objects]
    return np.bincount(cls, minlength=len(lt.LONGTAIL_NAMES))


def _read_labels(path: Path) -> np.ndarray:
    rows = [[float(v) for v in line.split()] for line in path.read_text().splitlines()]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


# --- determinism -------------------------------------------------------------------------------


def test_same_settings_give_identical_bytes(runs):
    a, b = _hashes(runs["a"]), _hashes(runs["b"])
    assert len(a) == 2 * N + 2
    assert a == b


def test_long_tail_differs_from_the_default_kind(runs):
    # Keyed by file name: the two kinds split images differently.
    a = {Path(k).name: v for k, v in _hashes(runs["a"]).items()}
    e = {Path(k).name: v for k, v in _hashes(runs["e"]).items()}
    assert a.keys() == e.keys()
    assert sum(a[k] != e[k] for k in a if k.endswith(".txt")) > N // 2


def test_image_k_does_not_depend_on_n(runs):
    """Rendered files for N=40 and N=70, and plans across block boundaries (200 images a block)."""
    for k in range(N):
        for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
            small = list((runs["a"] / kind).glob(f"*/syn_{k:06d}{suffix}"))
            large = list((runs["d"] / kind).glob(f"*/syn_{k:06d}{suffix}"))
            assert len(small) == len(large) == 1
            assert small[0].read_bytes() == large[0].read_bytes(), f"syn_{k:06d}{suffix}"
    short, long = lt.plan_dataset(250, 1, 128), lt.plan_dataset(450, 1, 128)
    assert short.images == long.images[:250]


# --- classes, shares and the class draw --------------------------------------------------------


def test_class_list_and_shares():
    assert len(lt.LONGTAIL_NAMES) >= 8
    assert len(set(lt.LONGTAIL_NAMES)) == len(lt.LONGTAIL_NAMES) == len(lt.LONGTAIL_SHARES)
    assert set(NEW_SHAPES) <= set(lt.LONGTAIL_NAMES)
    assert sum(lt.LONGTAIL_SHARES) == pytest.approx(1.0)
    assert max(lt.LONGTAIL_SHARES) / min(lt.LONGTAIL_SHARES) >= 50
    assert lt.LONGTAIL_SHARES[lt.RARE_CLASS] == min(lt.LONGTAIL_SHARES)
    # The rarest class is confusable with the most common one.
    assert (lt.RARE_CLASS, int(np.argmax(lt.LONGTAIL_SHARES))) in lt.CONFUSABLE_PAIRS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_label_frequencies_span_50x(seed):
    train = _counts(lt.plan_dataset(1500, seed, 128), "train")
    assert train.min() > 0
    assert train.max() / train.min() >= 50, train.tolist()
    # The order of the shares survives: the most common and the rarest are the planned ones.
    assert int(np.argmax(train)) == int(np.argmax(lt.LONGTAIL_SHARES))
    assert int(np.argmin(train)) == lt.RARE_CLASS


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_class_has_instances_in_train_and_val(seed):
    plan = lt.plan_dataset(1000, seed, 128)
    train, val = _counts(plan, "train"), _counts(plan, "val")
    assert train.min() >= lt.MIN_TRAIN, train.tolist()
    assert val.min() >= lt.MIN_VAL, val.tolist()
    assert plan.splits.count("val") == 250
    # Val is stratified, not skewed: every class's val share is near val_fraction.
    assert np.all(np.abs(val / (train + val) - 0.25) < 0.15), (val / (train + val)).round(2).tolist()
    assert sum(not p.objects for p, s in zip(plan.images, plan.splits) if s == "val") >= 3  # some backgrounds


def test_class_draw_follows_the_shares_without_forcing_rare_objects():
    """4000 images: each object's class follows the shares (the per-block minimum lifts the rarest
    a little); rare objects are not put into every k-th image, and many share it with few others."""
    images = [lt.image_classes(7, k) for k in range(4000)]
    counts = np.bincount([c for cls in images for c in cls], minlength=len(lt.LONGTAIL_NAMES))
    np.testing.assert_allclose(counts / counts.sum(), lt.LONGTAIL_SHARES, rtol=0.15, atol=0.0015)
    assert all(1 <= len(cls) <= 4 for k, cls in enumerate(images) if not shapes.is_background(k))
    assert all(cls == () for k, cls in enumerate(images) if shapes.is_background(k))
    holding = [k for k, cls in enumerate(images) if lt.RARE_CLASS in cls]
    assert len(holding) / 4000 < 0.03
    assert len({k % 12 for k in holding}) == 12  # no stride like the default kind's k % 12 == 5
    rare = [c for c, g in enumerate(lt.class_groups(counts)) if g == "rare"]
    company = [len(cls) for cls in images for c in cls if c in rare]  # objects in a rare object's image
    assert np.mean(np.array(company) <= 2) > 0.25


def test_block_quotas_are_proportional_with_a_floor():
    q = lt.block_quotas(500)
    assert q.sum() == 500 and q.min() >= lt.MIN_PER_BLOCK
    np.testing.assert_allclose(q, np.maximum(500 * np.asarray(lt.LONGTAIL_SHARES), lt.MIN_PER_BLOCK), atol=1.5)
    q = lt.block_quotas(100)  # shares alone would give hexagon 0.8 slots: lifted to the floor
    assert q[lt.RARE_CLASS] == lt.MIN_PER_BLOCK and q.sum() == 100
    assert q[int(np.argmax(lt.LONGTAIL_SHARES))] < 100 * max(lt.LONGTAIL_SHARES)


def test_objects_are_large_and_rarest_first():
    plan = lt.plan_dataset(300, 2, 128)
    sizes = []
    for p in plan.images:
        short = min(p.width, p.height)
        sizes += [o.size / short for o in p.objects]
        shares = [lt.LONGTAIL_SHARES[o.cls] for o in p.objects]
        assert shares == sorted(shares)  # rarer classes placed first
        assert [o.cls for o in p.objects] == list(lt.image_classes(2, p.index))  # nothing dropped
    assert lt.LOOK.size_range[0] - 1e-9 <= min(sizes) and max(sizes) <= lt.LOOK.size_range[1] + 1e-9
    assert np.median(sizes) > 0.3  # log-uniform 25-50%: median ~35%
    assert {p.max_lines for p in plan.images} == {lt.LOOK.max_lines} and lt.LOOK.max_lines < shapes.MAX_LINES


# --- groups and manifest -----------------------------------------------------------------------


def test_class_groups_rule_at_its_bounds():
    # 1000 labels: 19 (1.9%) rare, 20 (2%) common, 99 (9.9%) common, 100 (10%) frequent.
    counts = [19, 20, 99, 100, 762]
    assert lt.class_groups(counts) == ("rare", "common", "common", "frequent", "frequent")
    assert lt.class_groups([0, 0]) == ("rare", "rare")  # empty split: nothing is common


@pytest.mark.parametrize("seed", [0, 1])
def test_default_shares_give_at_least_two_classes_per_group(seed):
    groups = lt.class_groups(_counts(lt.plan_dataset(1500, seed, 128), "train"))
    assert all(groups.count(g) >= 2 for g in ("rare", "common", "frequent")), groups
    assert groups[lt.RARE_CLASS] == "rare"


def test_manifest_records_long_tail_counts_and_groups(runs):
    m = json.loads((runs["d"] / "manifest.json").read_text())
    assert m["long_tail"] is True and m["complete"] is True
    assert m["names"] == list(lt.LONGTAIL_NAMES)
    assert m["rare_class"] == "hexagon" and m["confusable_with"] == "circle"
    assert [["hexagon", "circle"], ["ring", "circle"]] == m["confusable_pairs"]
    assert m["label_shares"] == dict(zip(lt.LONGTAIL_NAMES, lt.LONGTAIL_SHARES))
    assert "rare < 2%" in m["groups_rule"] and "frequent >= 10%" in m["groups_rule"]
    total = np.zeros(len(lt.LONGTAIL_NAMES), int)
    for split in ("train", "val"):
        counts = np.zeros(len(lt.LONGTAIL_NAMES), int)
        for f in (runs["d"] / "labels" / split).glob("*.txt"):
            counts += np.bincount(_read_labels(f)[:, 0].astype(int), minlength=len(lt.LONGTAIL_NAMES))
        assert list(m["splits"][split]["class_counts"].values()) == counts.tolist()
        total += counts
    np.testing.assert_allclose(list(m["class_frequencies"].values()), total / total.sum(), atol=1e-6)
    train = np.array(list(m["splits"]["train"]["class_counts"].values()))
    share = train / train.sum()
    expected = ["rare" if s < 0.02 else "common" if s < 0.10 else "frequent" for s in share]
    assert list(m["groups"].values()) == expected
    data = yaml.safe_load((runs["d"] / "data.yaml").read_text())
    assert data["nc"] == len(lt.LONGTAIL_NAMES) and data["names"] == dict(enumerate(lt.LONGTAIL_NAMES))


def test_default_manifest_and_yaml_say_nothing_of_long_tail(runs):
    m = json.loads((runs["e"] / "manifest.json").read_text())
    assert "long_tail" not in m and "groups" not in m
    assert m["names"] == list(shapes.CLASS_NAMES)
    assert "--long-tail" not in (runs["e"] / "data.yaml").read_text()


def _plan_digest(plan: shapes.DatasetPlan) -> str:
    h = hashlib.sha256()
    for p, s in zip(plan.images, plan.splits):
        h.update(f"{p.index} {p.height} {p.width} {s} {p.split_key:.9f}".encode())
        for o in p.objects:
            h.update(f" {o.cls} {o.cx:.6f} {o.cy:.6f} {o.size:.6f} {o.angle:.6f} {o.outline}".encode())
        h.update(b"\n")
    return h.hexdigest()


def test_default_plans_are_unchanged_by_the_long_tail_kind():
    """Digests of default plans recorded before the long-tail kind was added (same numpy streams:
    a numpy release that changes Generator streams would change these too)."""
    assert _plan_digest(shapes.plan_dataset(300, 0, 128)) == (
        "064cff679dc8d3e70d0004be695c47570c096557e4d99164a17846d5ff1509e2")
    assert _plan_digest(shapes.plan_dataset(200, 5, 256, 0.1)) == (
        "4499566ba44b9e74d3af230bb119728d3b1f86267a1b8b7ff4c8b644d0626bdb")


# --- stratified split with several classes -----------------------------------------------------


def test_assign_splits_keeps_min_train_of_every_stratified_class():
    """20 hand-built images, class 9 in images 1-3, class 8 in 0, 1 (twice) and 4. Taking image 1
    for class 9 would leave train 2 of class 8's 4; with min_train=3 image 2 is taken instead."""
    objects = {0: (8,), 1: (9, 8, 8), 2: (9,), 3: (9,), 4: (8,)}
    plans = [shapes.ImagePlan(0, k, 64, 64, k / 20, tuple(shapes.ObjectPlan(c, 10, 10, 8, 0, 0)
                                                          for c in objects.get(k, (0,))))
             for k in range(20)]
    capped = shapes.assign_splits(plans, 0.25, classes=(9, 8), min_val=1, min_train=3)
    assert [k for k, s in enumerate(capped) if s == "val"] == [0, 2, 5, 6, 7]
    free = shapes.assign_splits(plans, 0.25, classes=(9, 8), min_val=1, min_train=0)
    assert [k for k, s in enumerate(free) if s == "val"] == [1, 5, 6, 7, 8]


# --- the new shapes ----------------------------------------------------------------------------


def _mask(cls: int, size: float = 64) -> np.ndarray:
    """(96, 96) bool pixels drawn for class `cls` alone, centred, unrotated, on flat grey."""
    img = np.full((96, 96, 3), 128, np.float32)
    box = shapes._draw_object(img, shapes.ObjectPlan(cls, 48, 48, size, 0.0, 0), np.random.default_rng(cls))
    assert box is not None
    return np.linalg.norm(img - 128, axis=2) > 45


def test_every_shape_draws_a_distinct_mask():
    masks = {c: _mask(c) for c in range(len(shapes.SHAPE_NAMES))}
    for c, m in masks.items():
        ys, xs = np.nonzero(m)
        assert max(np.ptp(xs), np.ptp(ys)) + 1 in (63, 64, 65), shapes.SHAPE_NAMES[c]  # longest side = size
    for a, b in itertools.combinations(masks, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.9, f"{shapes.SHAPE_NAMES[a]} and {shapes.SHAPE_NAMES[b]} draw nearly the same mask ({iou:.2f})"


def test_ring_has_a_hole_and_the_arrow_points_right():
    ring = _mask(shapes.SHAPE_NAMES.index("ring"))
    assert not ring[46:51, 46:51].any() and ring[48, 20] and ring[48, 76]
    arrow = _mask(shapes.SHAPE_NAMES.index("arrow"))
    # Columns 16-80: shaft up to x = 51, head after it, tip at 80.
    assert arrow[:, 75].sum() < arrow[:, 58].sum()  # the head narrows to a point on the right
    assert arrow[:, 30].sum() < 0.6 * arrow[:, 53].sum()  # the shaft: 0.42 of the head's base


def test_new_shapes_are_still_shapes_at_the_smallest_long_tail_size():
    """At 128 px on a 3:4 image an object is >= 0.25 * 96 = 24 px: every class still draws pixels
    and the ring keeps an open hole."""
    size = lt.LOOK.size_range[0] * 96
    for c in range(len(shapes.SHAPE_NAMES)):
        assert _mask(c, size).sum() > 0.25 * size**2, shapes.SHAPE_NAMES[c]
    assert not _mask(shapes.SHAPE_NAMES.index("ring"), size)[47:50, 47:50].any()


# --- command line ------------------------------------------------------------------------------


def test_flag_parses_and_defaults_off():
    parser = syn._build_parser()
    assert parser.parse_args(["--out", "x", "--images", "8", "--seed", "0", "--long-tail"]).long_tail is True
    assert parser.parse_args(["--out", "x", "--images", "8", "--seed", "0"]).long_tail is False


def test_cli_flag_matches_the_api_and_the_yaml_regenerate_line(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.data.synthetic", "--out", str(out), "--images", "8", "--seed", "2",
         "--imgsz", "64", "--long-tail"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    syn.generate(tmp_path / "api", 8, 2, imgsz=64, long_tail=True)
    assert _hashes(out) == _hashes(tmp_path / "api")
    # The data YAML's regenerate comment reproduces the dataset.
    line = next(x for x in (out / "data.yaml").read_text().splitlines() if x.startswith("# Regenerate: "))
    line = line.replace("<this folder>", str(tmp_path / "again"))
    argv = shlex.split(line.removeprefix("# Regenerate: python -m trainer.data.synthetic "))
    assert "--long-tail" in argv
    assert syn.main(argv) == 0
    assert _hashes(tmp_path / "again") == _hashes(out)
