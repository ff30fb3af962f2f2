"""Validation metrics for a detector: COCO-exact mAP and per-class maps, YOLOv5-style P/R.

``DetectionMetrics`` follows reset() / update() / compute(). Its state is a list of per-image
numpy arrays, so a distributed caller can all-gather ``state()`` from every rank, ``merge()``
them into one instance and call ``compute()`` there. Each updated image is one COCO image,
categories are 0..nc-1, ground-truth area is the box area and nothing is a crowd.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from trainer.metrics.coco import (
    RECALL_THRESHOLDS,
    CocoDT,
    CocoGT,
    CocoMatches,
    match_detections,
    result_from_matches,
)

N_CONF_POINTS = 1000  # confidence grid of the P/R/F1 curves, as YOLOv5 v6+


def _as_array(x: Any, cols: int, what: str) -> np.ndarray:
    """(N, cols) float64 from a tensor or array-like; empty input becomes (0, cols)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, cols))
    if arr.ndim != 2 or arr.shape[1] != cols:
        raise ValueError(f"{what} must have shape (N, {cols}), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains non-finite values")
    return arr


def _check_classes(cls: np.ndarray, nc: int, what: str) -> None:
    bad = (cls != np.round(cls)) | (cls < 0) | (cls >= nc)
    if bad.any():
        raise ValueError(f"{what}: class {cls[bad][0].item()!r} is not an integer in [0, {nc})")


def _xyxy_to_xywh(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b[:, :2], b[:, 2:4] - b[:, :2]], axis=1)


class DetectionMetrics:
    """Accumulates per-image predictions and labels; compute() returns the metrics dict."""

    def __init__(self, nc: int, names: Sequence[str] | None = None):
        if nc < 1:
            raise ValueError(f"nc must be >= 1, got {nc}")
        if names is not None and len(names) != nc:
            raise ValueError(f"{len(names)} names given for {nc} classes")
        self.nc = nc
        self.names = list(names) if names is not None else [str(i) for i in range(nc)]
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._preds: list[np.ndarray] = []  # per image (N, 6) [x1, y1, x2, y2, conf, cls]
        self._gts: list[np.ndarray] = []  # per image (M, 5) [cls, x1, y1, x2, y2]

    def update(self, preds: Any, gts: Any, image_shape_hw: tuple[int, int] | None = None) -> None:
        """Add one image: preds (N, 6) [x1, y1, x2, y2, conf, cls], gts (M, 5) [cls, x1..y2].

        Both in original-image pixels. With image_shape_hw the predicted boxes are clipped to
        the image, as YOLOv5 does after rescaling.
        """
        p = _as_array(preds, 6, "preds")
        g = _as_array(gts, 5, "gts")
        _check_classes(p[:, 5], self.nc, "preds")
        _check_classes(g[:, 0], self.nc, "gts")
        if (g[:, 3:5] < g[:, 1:3]).any() or (p[:, 2:4] < p[:, 0:2]).any():
            raise ValueError("boxes must be [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1")
        if image_shape_hw is not None:
            h, w = image_shape_hw
            p = p.copy()
            p[:, [0, 2]] = p[:, [0, 2]].clip(0, w)
            p[:, [1, 3]] = p[:, [1, 3]].clip(0, h)
        self._preds.append(p.astype(np.float32))
        self._gts.append(g.astype(np.float32))

    def state(self) -> dict:
        """Picklable state for all-gathering across ranks."""
        return {"nc": self.nc, "preds": list(self._preds), "gts": list(self._gts)}

    def merge(self, states: Sequence[Mapping]) -> None:
        """Append other states' images (in the order given) to this one."""
        for s in states:
            if s["nc"] != self.nc:
                raise ValueError(f"cannot merge a state with nc={s['nc']} into nc={self.nc}")
            self._preds.extend(s["preds"])
            self._gts.extend(s["gts"])

    def _coco_inputs(self) -> tuple[CocoGT, CocoDT]:
        n_img = len(self._gts)
        g = np.concatenate(self._gts) if n_img else np.zeros((0, 5))
        p = np.concatenate(self._preds) if n_img else np.zeros((0, 6))
        g, p = g.astype(np.float64), p.astype(np.float64)
        gt = CocoGT.from_arrays(
            image_ids=np.arange(n_img),
            image_id=np.repeat(np.arange(n_img), [len(x) for x in self._gts]),
            category_id=g[:, 0].astype(np.int64),
            bbox=_xyxy_to_xywh(g[:, 1:5]),
            category_ids=np.arange(self.nc),
        )
        dt = CocoDT.from_arrays(
            image_id=np.repeat(np.arange(n_img), [len(x) for x in self._preds]),
            category_id=p[:, 5].astype(np.int64),
            bbox=_xyxy_to_xywh(p[:, :4]),
            score=p[:, 4],
        )
        return gt, dt

    def compute(self) -> dict:
        """Metrics over every image added (see the module docstring for the keys' meaning)."""
        matches = match_detections(*self._coco_inputs())
        coco = result_from_matches(matches)
        n_gt = matches.n_gt[:, 0]  # (nc,) non-crowd labels per class
        has_gt = n_gt > 0
        ap = coco.ap_per_class
        maps = np.zeros(self.nc)
        if has_gt.any():
            maps = np.where(has_gt, ap, ap[has_gt].mean())
        curves = _confidence_curves(matches, n_gt)
        f1 = curves["f1"]
        best = int(f1[has_gt].mean(0).argmax()) if has_gt.any() else 0
        p_cls = np.where(has_gt, curves["precision"][:, best], 0.0)
        r_cls = np.where(has_gt, curves["recall"][:, best], 0.0)
        pr50 = coco.precision[0, :, :, 0, 2].T  # (nc, R) at IoU .5, area all, 100 dets
        stats = coco.stats
        return {
            "precision": float(p_cls[has_gt].mean()) if has_gt.any() else 0.0,
            "recall": float(r_cls[has_gt].mean()) if has_gt.any() else 0.0,
            "map50": max(float(stats[1]), 0.0),
            "map": max(float(stats[0]), 0.0),
            "maps": maps,
            "ap50_per_class": coco.ap50_per_class,
            "ap_per_class": ap,
            "p_per_class": p_cls,
            "r_per_class": r_cls,
            "n_gt_per_class": n_gt,
            "coco_stats": stats,
            "n_images": len(self._gts),
            "best_conf": float(curves["conf"][best]),
            "names": list(self.names),
            "pr_curve": {"recall": RECALL_THRESHOLDS.copy(), "precision": np.maximum(pr50, 0.0)},
            "conf_curve": curves,
        }


def _confidence_curves(m: CocoMatches, n_gt: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall and F1 versus confidence at IoU 0.5 (YOLOv5 ap_per_class).

    Uses COCO's matches at IoU .5, area all, 100 detections. Returns {"conf": (P,),
    "precision", "recall", "f1": (nc, P)}; classes without labels or detections stay 0.
    """
    nc = len(n_gt)
    conf = np.linspace(0, 1, N_CONF_POINTS)
    p_curve, r_curve = np.zeros((nc, len(conf))), np.zeros((nc, len(conf)))
    tp, fp = m.tp[0, 0], m.fp[0, 0]  # (D,) at IoU 0.5, area "all"
    order = np.lexsort((m.det_rank, m.det_image, -m.det_score, m.det_category))
    order = order[(tp | fp)[order]]  # drop detections COCO ignores
    bounds = np.searchsorted(m.det_category[order], np.arange(nc + 1))
    for c in np.nonzero(n_gt > 0)[0]:
        idx = order[bounds[c]:bounds[c + 1]]
        if len(idx) == 0:
            continue
        tpc, fpc = np.cumsum(tp[idx]), np.cumsum(fp[idx])
        # np.interp needs increasing x: negate the descending scores
        r_curve[c] = np.interp(-conf, -m.det_score[idx], tpc / n_gt[c], left=0)
        p_curve[c] = np.interp(-conf, -m.det_score[idx], tpc / (tpc + fpc), left=1)
    f1 = 2 * p_curve * r_curve / (p_curve + r_curve + 1e-16)
    return {"conf": conf, "precision": p_curve, "recall": r_curve, "f1": f1}


def fitness(metrics: Mapping[str, Any]) -> float:
    """YOLOv5's model fitness: 0.1 * mAP@.5 + 0.9 * mAP@.5:.95."""
    return 0.1 * float(metrics["map50"]) + 0.9 * float(metrics["map"])
