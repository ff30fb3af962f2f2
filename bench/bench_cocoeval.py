"""Benchmark: kfyolo's COCO evaluation against pycocotools on a synthetic validation set.

    .venv/bin/python bench/bench_cocoeval.py                 # 5,000 images, the reference size
    .venv/bin/python bench/bench_cocoeval.py --images 500    # quicker

Builds a deterministic set (~7 ground truths and ~30 detections per image over 80 classes,
some crowds, tied scores, a few images past 100 detections), evaluates it with both, checks
that the 12 stats and the precision array agree, and prints wall times and the speed ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.metrics.coco import evaluate_coco  # noqa: E402
from trainer.metrics.coco_json import load_coco_dt, load_coco_gt  # noqa: E402


def synthetic_set(n_images: int, n_classes: int = 80, seed: int = 0) -> tuple[dict, list]:
    """A COCO ground-truth dict and detection list, deterministic in seed."""
    rng = np.random.default_rng(seed)
    images = [{"id": int(i) + 1, "width": 640, "height": 640} for i in range(n_images)]
    anns, dets = [], []
    for img in images:
        n_gt = int(rng.poisson(7))
        size = np.exp(rng.uniform(np.log(4), np.log(400), n_gt))  # tiny to large
        wh = size[:, None] * rng.uniform(0.6, 1.6, (n_gt, 2))
        xy = rng.uniform(0, 640, (n_gt, 2)) - wh / 2
        cls = rng.integers(0, n_classes, n_gt)
        crowd = rng.random(n_gt) < 0.03
        for b, c, k in zip(np.hstack([xy, wh]).round(2), cls, crowd):
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(c) + 1,
                         "bbox": b.tolist(), "area": float(b[2] * b[3]), "iscrowd": int(k)})
        n_dt = int(rng.poisson(30)) if rng.random() > 0.01 else 150  # a few > maxDets
        near = rng.random(n_dt) < 0.6
        src = rng.integers(0, max(n_gt, 1), n_dt)
        boxes = np.hstack([rng.uniform(0, 600, (n_dt, 2)), rng.uniform(4, 300, (n_dt, 2))])
        dcls = rng.integers(0, n_classes, n_dt)
        if n_gt:
            noise = rng.normal(0, 0.08, (n_dt, 4)) * np.tile(wh[src], 2)
            jitter = np.hstack([xy, wh])[src] + noise
            jitter[:, 2:] = np.abs(jitter[:, 2:])
            boxes = np.where(near[:, None], jitter, boxes)
            wrong = rng.random(n_dt) < 0.1
            dcls = np.where(near & ~wrong, cls[src], dcls)
        score = rng.random(n_dt).round(3)  # rounding makes ties
        for b, c, s in zip(boxes.round(2), dcls, score):
            dets.append({"image_id": img["id"], "category_id": int(c) + 1,
                         "bbox": b.tolist(), "score": float(s)})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c + 1, "name": f"class{c}"} for c in range(n_classes)]}
    return gt, dets


def run_pycocotools(gt: dict, dets: list):
    """COCO() + loadRes + evaluate + accumulate + summarize; returns (stats, precision)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), ev.eval["precision"]


def main() -> None:
    """Build the set, time both evaluators and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3, help="best-of for kfyolo's timings")
    args = parser.parse_args()

    gt, dets = synthetic_set(args.images)
    print(f"{args.images} images, {len(gt['annotations'])} ground truths, {len(dets)} detections")

    t_load, t_eval = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        coco_gt = load_coco_gt(gt)
        coco_dt = load_coco_dt(dets, coco_gt)
        t1 = time.perf_counter()
        result = evaluate_coco(coco_gt, coco_dt)
        t2 = time.perf_counter()
        t_load.append(t1 - t0)
        t_eval.append(t2 - t1)
    t0 = time.perf_counter()
    ref_stats, ref_precision = run_pycocotools(gt, dets)
    t_ref = time.perf_counter() - t0

    stat_diff = np.abs(ref_stats - result.stats).max()
    prec_diff = np.abs(ref_precision - result.precision).max()
    best_eval, best_total = min(t_eval), min(a + b for a, b in zip(t_load, t_eval))
    print("stats (kfyolo):      ", np.array2string(result.stats, precision=4))
    print("stats (pycocotools): ", np.array2string(ref_stats, precision=4))
    print(f"max |diff|: stats {stat_diff:.3g}, precision array {prec_diff:.3g}")
    print(f"pycocotools (load+evaluate+accumulate+summarize): {t_ref:.2f} s")
    print(f"kfyolo evaluate_coco:                             {best_eval:.3f} s "
          f"({t_ref / best_eval:.1f}x)")
    print(f"kfyolo load JSON dicts + evaluate_coco:           {best_total:.3f} s "
          f"({t_ref / best_total:.1f}x)")
    if stat_diff != 0 or prec_diff != 0:
        raise SystemExit("results differ from pycocotools")


if __name__ == "__main__":
    main()
