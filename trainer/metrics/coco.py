"""COCO-exact bounding-box evaluation, vectorised with numpy.

Reproduces pycocotools' ``COCOeval(iouType="bbox")`` with its default parameters number for
number (same IoU arithmetic, greedy matching, tie-breaking and averaging), but evaluates every
(image, category) group at once instead of one Python loop per group.

Behaviour kept on purpose because it changes the numbers:

- images and categories are taken in sorted-id order; equal scores are ordered by image, then by
  position in the detection list;
- at most 100 detections per (image, category), best score first, are kept *before* matching;
- a ground truth is ignored when it is a crowd or its ``area`` lies outside the area range
  (both ends inclusive). pycocotools overwrites any ``ignore`` key with ``iscrowd``, so an
  ``ignore`` key has no effect here either;
- crowd IoU is intersection / detection area, and a crowd may absorb several detections;
- a detection matched to an annotation whose id is 0 counts as unmatched, because pycocotools
  records matches by annotation id and tests the id against 0 (the loader warns about such ids).

The input containers ``CocoGT`` / ``CocoDT`` hold flat arrays; ``trainer.metrics.coco_json``
builds them from COCO JSON and raises ``CocoFormatError`` naming the offending entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


__all__ = [
    "AREA_LABELS", "AREA_RANGES", "IOU_THRESHOLDS", "MAX_DETS", "RECALL_THRESHOLDS", "STAT_KEYS",
    "CocoDT", "CocoFormatError", "CocoGT", "CocoMatches", "CocoResult",
    "accumulate", "bbox_iou_xywh", "evaluate_coco",
    "match_detections", "result_from_matches", "summarize",
]

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # (T,) built exactly as COCOeval's Params
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # (R,)
MAX_DETS = (1, 10, 100)  # (M,)
AREA_RANGES = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))  # (A, 2)
AREA_LABELS = ("all", "small", "medium", "large")
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# (is_ap, iou_threshold or None for all, area index, maxDets index) for each of the 12 stats
_STAT_SPECS = (
    (True, None, 0, 2), (True, 0.5, 0, 2), (True, 0.75, 0, 2),
    (True, None, 1, 2), (True, None, 2, 2), (True, None, 3, 2),
    (False, None, 0, 0), (False, None, 0, 1), (False, None, 0, 2),
    (False, None, 1, 2), (False, None, 2, 2), (False, None, 3, 2),
)


class CocoFormatError(ValueError):
    """A ground-truth or detection input that cannot be evaluated; the message names the entry."""


@dataclass(frozen=True, eq=False)
class CocoGT:
    """Ground truth as flat arrays, one row per annotation."""

    image_ids: np.ndarray  # (I,) every image evaluated, with or without annotations
    category_ids: np.ndarray  # (K,) categories evaluated
    image_id: np.ndarray  # (G,)
    category_id: np.ndarray  # (G,)
    bbox: np.ndarray  # (G, 4) float64 [x, y, w, h]
    area: np.ndarray  # (G,) float64, what COCO compares with the area ranges
    iscrowd: np.ndarray  # (G,) bool
    ann_id: np.ndarray  # (G,) annotation ids; only "== 0" matters (see the module docstring)

    @classmethod
    def from_arrays(
        cls, image_ids, image_id, category_id, bbox, area=None, iscrowd=None,
        category_ids=None, ann_id=None,
    ) -> CocoGT:
        """Build from array-likes; area defaults to w*h, iscrowd to 0, ids to 1..G."""
        box = np.asarray(bbox, np.float64).reshape(-1, 4)
        n = len(box)
        cat = np.asarray(category_id).reshape(n)
        return cls(
            image_ids=np.asarray(image_ids).reshape(-1),
            category_ids=np.unique(cat) if category_ids is None else np.asarray(category_ids),
            image_id=np.asarray(image_id).reshape(n),
            category_id=cat,
            bbox=box,
            area=box[:, 2] * box[:, 3] if area is None else np.asarray(area, np.float64),
            iscrowd=np.zeros(n, bool) if iscrowd is None else np.asarray(iscrowd).astype(bool),
            ann_id=np.arange(1, n + 1) if ann_id is None else np.asarray(ann_id).reshape(n),
        )


@dataclass(frozen=True, eq=False)
class CocoDT:
    """Detections as flat arrays, one row per detection."""

    image_id: np.ndarray  # (D,)
    category_id: np.ndarray  # (D,)
    bbox: np.ndarray  # (D, 4) float64 [x, y, w, h]; area is w*h as in COCO.loadRes
    score: np.ndarray  # (D,) float64

    @classmethod
    def from_arrays(cls, image_id, category_id, bbox, score) -> CocoDT:
        """Build from array-likes."""
        box = np.asarray(bbox, np.float64).reshape(-1, 4)
        n = len(box)
        return cls(
            image_id=np.asarray(image_id).reshape(n),
            category_id=np.asarray(category_id).reshape(n),
            bbox=box,
            score=np.asarray(score, np.float64).reshape(n),
        )


@dataclass(frozen=True, eq=False)
class CocoMatches:
    """Per-detection outcome of the greedy matching, detections in (category, image, rank) order."""

    image_ids: np.ndarray  # (I,) sorted evaluated image ids
    category_ids: np.ndarray  # (K,) sorted evaluated category ids
    det_image: np.ndarray  # (D,) image index of each kept detection
    det_category: np.ndarray  # (D,) category index
    det_rank: np.ndarray  # (D,) rank by score inside its (image, category), < max(MAX_DETS)
    det_score: np.ndarray  # (D,) float64
    tp: np.ndarray  # (A, T, D) bool, matched and not ignored
    fp: np.ndarray  # (A, T, D) bool, unmatched and not ignored
    n_gt: np.ndarray  # (K, A) int64, ground truths not ignored ("npig")


@dataclass(frozen=True, eq=False)
class CocoResult:
    """The accumulated COCO evaluation; arrays follow COCOeval.eval's layout."""

    stats: np.ndarray  # (12,) AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
    ap_per_class: np.ndarray  # (K,) AP@[.5:.95], area all, maxDets 100; -1 without ground truth
    ap50_per_class: np.ndarray  # (K,) AP@.5 likewise
    precision: np.ndarray  # (T, R, K, A, M)
    recall: np.ndarray  # (T, K, A, M)
    category_ids: np.ndarray  # (K,)

    def as_dict(self) -> dict[str, float]:
        """The 12 summary stats keyed AP ... ARl (-1 where undefined)."""
        return {k: float(v) for k, v in zip(STAT_KEYS, self.stats)}


def bbox_iou_xywh(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of paired boxes (P, 4) xywh, with pycocotools' exact float arithmetic.

    For a crowd ground truth the union is the detection area alone.
    """
    w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
    overlap = (w > 0) & (h > 0)
    inter = w * h
    d_area = d[:, 2] * d[:, 3]
    union = np.where(crowd, d_area, (d_area + g[:, 2] * g[:, 3]) - inter)
    out = np.zeros(len(d))
    np.divide(inter, union, out=out, where=overlap)
    return out


def _index_in(sorted_ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each value in sorted_ids and whether it is there: ((N,) int64, (N,) bool)."""
    if len(sorted_ids) == 0 or len(values) == 0:
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == values


def _area_ignore(area: np.ndarray) -> np.ndarray:
    """(A, N) bool: area outside each range, both ends inclusive as in COCOeval."""
    rng = np.asarray(AREA_RANGES)
    return (area[None] < rng[:, :1]) | (area[None] > rng[:, 1:])


def match_detections(
    gt: CocoGT, dt: CocoDT, category_ids: Sequence[int] | None = None
) -> CocoMatches:
    """Run COCOeval.evaluate's per-(image, category) greedy matching for every group at once."""
    img_ids = np.unique(gt.image_ids)
    cat_ids = np.unique(gt.category_ids if category_ids is None else np.asarray(category_ids))
    n_img = len(img_ids)
    # ground truths: keep evaluated images/categories, order by group then file order
    g_img, ok_i = _index_in(img_ids, gt.image_id)
    g_cat, ok_c = _index_in(cat_ids, gt.category_id)
    keep = ok_i & ok_c
    g_key = g_cat[keep] * n_img + g_img[keep]
    g_order = np.argsort(g_key, kind="stable")
    g_key = g_key[g_order]
    g_box = gt.bbox[keep][g_order]  # (G, 4)
    g_crowd = gt.iscrowd[keep][g_order].astype(bool)
    g_counts = gt.ann_id[keep][g_order] != 0  # matches by id 0 read as "no match" in COCOeval
    g_ign = g_crowd[None] | _area_ignore(gt.area[keep][g_order].astype(np.float64))  # (A, G)
    g_cat = g_cat[keep][g_order]
    n_gt = np.stack([np.bincount(g_cat[~ig], minlength=len(cat_ids)) for ig in g_ign], 1)

    # detections: order by group, score descending (stable), keep the best max(MAX_DETS)
    d_img, ok_i = _index_in(img_ids, dt.image_id)
    d_cat, ok_c = _index_in(cat_ids, dt.category_id)
    keep = np.nonzero(ok_i & ok_c)[0]
    d_key = d_cat[keep] * n_img + d_img[keep]
    score = dt.score[keep].astype(np.float64)
    order = keep[np.lexsort((keep, -score, d_key))]
    d_key = d_cat[order] * n_img + d_img[order]
    first = np.searchsorted(d_key, d_key, side="left")
    rank = np.arange(len(order)) - first
    kept = rank < MAX_DETS[-1]
    order, d_key, rank = order[kept], d_key[kept], rank[kept]
    d_box = dt.bbox[order].astype(np.float64)  # (D, 4)

    det_gt = _greedy_match(d_key, rank, d_box, g_key, g_box, g_crowd, g_ign)  # (A, T, D)
    matched = det_gt >= 0
    safe = np.where(matched, det_gt, 0)
    counted = matched & g_counts[safe] if len(g_key) else matched
    a_idx = np.arange(len(AREA_RANGES))[:, None, None]
    d_out = _area_ignore(d_box[:, 2] * d_box[:, 3])[:, None, :]  # (A, 1, D)
    ignored = (matched & g_ign[a_idx, safe]) if len(g_key) else np.zeros_like(matched)
    ignored |= ~counted & d_out
    return CocoMatches(
        image_ids=img_ids, category_ids=cat_ids,
        det_image=d_img[order], det_category=d_cat[order], det_rank=rank,
        det_score=dt.score[order].astype(np.float64),
        tp=counted & ~ignored, fp=~counted & ~ignored, n_gt=n_gt,
    )


def _greedy_match(d_key, rank, d_box, g_key, g_box, g_crowd, g_ign) -> np.ndarray:
    """Index of the ground truth each detection takes, per (area, IoU threshold); -1 for none.

    The matching is sequential in score order inside a group, so groups advance together one
    detection rank per step. Only pairs with IoU >= the lowest threshold can ever match, so the
    per-step work is over each detection's few candidate ground truths.
    """
    n_area, n_det, n_g = len(AREA_RANGES), len(d_key), len(g_key)
    out = np.full((n_area, len(IOU_THRESHOLDS), n_det), -1, np.int64)
    if n_det == 0 or n_g == 0:
        return out
    thr = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)  # (T,) COCOeval's clamp
    lo = np.searchsorted(g_key, d_key, side="left")
    cnt = np.searchsorted(g_key, d_key, side="right") - lo
    # every (detection, ground truth) pair of the same group, ground truths in file order
    p_det = np.repeat(np.arange(n_det), cnt)
    p_gt = np.arange(len(p_det)) - np.repeat(np.cumsum(cnt) - cnt - lo, cnt)
    p_iou = bbox_iou_xywh(d_box[p_det], g_box[p_gt], g_crowd[p_gt])
    cand = p_iou >= thr[0]
    p_det, p_gt, p_iou = p_det[cand], p_gt[cand], p_iou[cand]
    c_lo = np.searchsorted(p_det, np.arange(n_det), side="left")
    c_cnt = np.searchsorted(p_det, np.arange(n_det), side="right") - c_lo
    taken = np.zeros((n_area, len(thr), n_g + 1), bool)  # last slot: sink for padding
    crowd = np.append(g_crowd, False)
    ign = np.concatenate([g_ign, np.zeros((n_area, 1), bool)], axis=1)  # (A, G + 1)
    active = c_cnt > 0
    for r in np.unique(rank[active]):
        dets = np.nonzero(active & (rank == r))[0]  # one detection per group at most
        width = int(c_cnt[dets].max())
        col = np.arange(width)
        valid = col < c_cnt[dets, None]  # (n, C)
        pidx = np.where(valid, c_lo[dets, None] + col, 0)
        cg = np.where(valid, p_gt[pidx], n_g)  # (n, C) candidate ground truths
        ci = np.where(valid, p_iou[pidx], -1.0)  # (n, C)
        ok = (ci[None] >= thr[:, None, None])[None] & (~taken[:, :, cg] | crowd[cg])  # (A,T,n,C)
        pref = ok & ~ign[:, None, cg]
        use = np.where(pref.any(-1, keepdims=True), pref, ok)  # non-ignored first
        best = width - 1 - np.argmax(np.where(use, ci, -np.inf)[..., ::-1], axis=-1)  # last max
        hit = use.any(-1)  # (A, T, n)
        g_sel = np.where(hit, cg[np.arange(len(dets)), best], -1)
        out[:, :, dets] = g_sel
        a_i, t_i, n_i = np.nonzero(hit)
        taken[a_i, t_i, g_sel[a_i, t_i, n_i]] = True
    return out


def _recall_positions(tpc: np.ndarray, n_gt: np.ndarray) -> np.ndarray:
    """searchsorted(tp / n_gt, RECALL_THRESHOLDS, 'left') for every row, exactly.

    tpc: (A, T, n) int64 cumulative true positives; n_gt: (A,). Returns (A, T, R).
    rc < thr holds iff tp < v*, v* being the smallest integer with v* / n_gt >= thr, so the
    float search becomes an integer one that can run on all rows at once.
    """
    n_a, n_t, n = tpc.shape
    v_star = np.stack(
        [np.searchsorted(np.arange(g + 1) / g, RECALL_THRESHOLDS, side="left") for g in n_gt]
    )  # (A, R)
    span = int(n_gt.max()) + 2
    row = np.arange(n_a * n_t).reshape(n_a, n_t)
    keys = (tpc + row[..., None] * span).ravel()
    queries = v_star[:, None, :] + row[..., None] * span  # (A, T, R)
    return np.searchsorted(keys, queries, side="left") - row[..., None] * n


def _precision_recall(tp: np.ndarray, fp: np.ndarray, n_gt: np.ndarray):
    """COCOeval.accumulate for one (category, maxDets): tp/fp (A, T, n) in score order.

    Returns precision (T, R, A) sampled at RECALL_THRESHOLDS and recall (T, A).
    """
    n_a, n_t, n = tp.shape
    if n == 0:
        return np.zeros((n_t, len(RECALL_THRESHOLDS), n_a)), np.zeros((n_t, n_a))
    tpc = np.cumsum(tp, axis=-1)
    tp_sum, fp_sum = tpc.astype(float), np.cumsum(fp, axis=-1).astype(float)
    rc = tp_sum / n_gt[:, None, None].astype(float)
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    pr = np.maximum.accumulate(pr[..., ::-1], axis=-1)[..., ::-1]  # monotone, right to left
    pos = _recall_positions(tpc, n_gt)
    q = np.take_along_axis(pr, np.minimum(pos, n - 1), axis=-1)
    q[pos >= n] = 0.0  # recall never reached: COCOeval leaves zeros
    return q.transpose(1, 2, 0), rc[..., -1].T


def accumulate(m: CocoMatches) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), -1 if undefined."""
    n_t, n_r, n_k = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(m.category_ids)
    n_a, n_m = len(AREA_RANGES), len(MAX_DETS)
    precision = -np.ones((n_t, n_r, n_k, n_a, n_m))
    recall = -np.ones((n_t, n_k, n_a, n_m))
    # per category: score descending, ties by image order then rank, as COCOeval's mergesort
    order = np.lexsort((m.det_rank, m.det_image, -m.det_score, m.det_category))
    bounds = np.searchsorted(m.det_category[order], np.arange(n_k + 1))
    for k in range(n_k):
        areas = np.nonzero(m.n_gt[k] > 0)[0]
        if len(areas) == 0:
            continue
        idx_k = order[bounds[k]:bounds[k + 1]]
        tp_k, fp_k = m.tp[areas][:, :, idx_k], m.fp[areas][:, :, idx_k]
        for mi, max_det in enumerate(MAX_DETS):
            sel = m.det_rank[idx_k] < max_det
            p, r = _precision_recall(tp_k[..., sel], fp_k[..., sel], m.n_gt[k, areas])
            precision[:, :, k, areas, mi] = p
            recall[:, k, areas, mi] = r
    return precision, recall


def _mean_defined(s: np.ndarray) -> float:
    """Mean of entries > -1, or -1 when there are none (COCOeval.summarize)."""
    v = s[s > -1]
    return float(np.mean(v)) if v.size else -1.0


def summarize(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """The 12 COCOeval.summarize stats from accumulated precision and recall."""
    stats = np.zeros(len(_STAT_SPECS))
    for i, (is_ap, iou, a, m) in enumerate(_STAT_SPECS):
        s = precision if is_ap else recall
        if iou is not None:
            s = s[np.where(iou == IOU_THRESHOLDS)[0]]
        stats[i] = _mean_defined(s[..., a, m])
    return stats


def result_from_matches(m: CocoMatches) -> CocoResult:
    """Accumulate and summarise matched detections into a CocoResult."""
    precision, recall = accumulate(m)
    n_k = precision.shape[2]
    ap = np.array([_mean_defined(precision[:, :, k, 0, 2]) for k in range(n_k)])
    ap50 = np.array([_mean_defined(precision[0, :, k, 0, 2]) for k in range(n_k)])
    return CocoResult(
        stats=summarize(precision, recall), ap_per_class=ap, ap50_per_class=ap50,
        precision=precision, recall=recall, category_ids=m.category_ids,
    )


def evaluate_coco(
    gt: CocoGT, dt: CocoDT, category_ids: Sequence[int] | None = None
) -> CocoResult:
    """Evaluate detections against ground truth exactly as COCOeval (bbox, default params).

    Categories are gt.category_ids (or category_ids), in sorted order; images gt.image_ids.
    """
    return result_from_matches(match_detections(gt, dt, category_ids))
