"""trainer.metrics.coco against pycocotools' COCOeval (bbox), the reference."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.metrics.coco import (
    CocoDT,
    CocoFormatError,
    CocoGT,
    bbox_iou_xywh,
    evaluate_coco,
)
from trainer.metrics.coco_json import load_coco_dt, load_coco_gt

TOL = 1e-6


def reference(gt: dict, dets: list, cat_ids=None) -> COCOeval:
    """pycocotools on the same data; an empty result list is built by hand (loadRes needs one)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def ours(gt: dict, dets: list, cat_ids=None):
    coco_gt = load_coco_gt(gt)
    return evaluate_coco(coco_gt, load_coco_dt(dets, coco_gt), cat_ids)


def assert_same(gt: dict, dets: list, cat_ids=None, context="") -> None:
    ref, res = reference(gt, dets, cat_ids), ours(gt, dets, cat_ids)
    np.testing.assert_allclose(res.stats, ref.stats, atol=TOL, rtol=0, err_msg=context)
    p = ref.eval["precision"]  # (T, R, K, A, M)
    for k in range(p.shape[2]):
        s = p[:, :, k, 0, 2]
        ap = s[s > -1].mean() if (s > -1).any() else -1
        s50 = p[0, :, k, 0, 2]
        ap50 = s50[s50 > -1].mean() if (s50 > -1).any() else -1
        assert abs(res.ap_per_class[k] - ap) < TOL, f"{context} class {k} AP"
        assert abs(res.ap50_per_class[k] - ap50) < TOL, f"{context} class {k} AP50"
    np.testing.assert_allclose(res.precision, p, atol=TOL, rtol=0, err_msg=context)
    np.testing.assert_allclose(res.recall, ref.eval["recall"], atol=TOL, rtol=0, err_msg=context)


def _random_box(rng, scale_lo=1.0, scale_hi=400.0, integer=False):
    s = float(np.exp(rng.uniform(np.log(scale_lo), np.log(scale_hi))))  # tiny to huge
    w, h = s * rng.uniform(0.5, 2.0), s * rng.uniform(0.5, 2.0)
    x, y = rng.uniform(-20, 500, 2)
    box = [x, y, w, h]
    return [float(round(v)) for v in box] if integer else [float(v) for v in box]


def random_case(seed: int) -> tuple[dict, list]:
    """Random images: crowds, empty images, prediction- or label-only images, tied scores,
    explicit areas that differ from the box area, and some images past 100 detections."""
    rng = np.random.default_rng(seed)
    n_img, n_cat = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    images = [{"id": int(i) + 1} for i in rng.permutation(50)[:n_img]]
    cats = [{"id": int(c) + 1} for c in rng.permutation(30)[:n_cat]]
    anns, dets = [], []
    for img in images:
        kind = rng.random()
        n_gt = 0 if kind < 0.1 else int(rng.integers(0, 12))
        n_dt = 0 if 0.1 <= kind < 0.2 else int(rng.integers(0, 30))
        if rng.random() < 0.1:
            n_dt = int(rng.integers(100, 140))  # maxDets truncation
        placed = []
        for _ in range(n_gt):
            box = _random_box(rng, integer=rng.random() < 0.3)
            cat = cats[int(rng.integers(n_cat))]["id"]
            area = box[2] * box[3] * (rng.uniform(0.3, 1.0) if rng.random() < 0.4 else 1.0)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat,
                         "bbox": box, "area": float(area), "iscrowd": int(rng.random() < 0.1)})
            placed.append((box, cat))
        for _ in range(n_dt):
            if placed and rng.random() < 0.7:  # near a label, sometimes with the wrong class
                box, cat = placed[int(rng.integers(len(placed)))]
                j = rng.normal(0, 0.12, 4) * [box[2], box[3], box[2], box[3]]
                box = [box[0] + j[0], box[1] + j[1], abs(box[2] + j[2]), abs(box[3] + j[3])]
                box = [float(v) for v in box]
                if rng.random() < 0.15:
                    cat = cats[int(rng.integers(n_cat))]["id"]
            else:
                box, cat = _random_box(rng), cats[int(rng.integers(n_cat))]["id"]
            tied = rng.random() < 0.3
            score = float(rng.choice([0.2, 0.5, 0.9])) if tied else float(rng.random())
            dets.append({"image_id": img["id"], "category_id": cat, "bbox": box, "score": score})
    return {"images": images, "categories": cats, "annotations": anns}, dets


def grid_case(seed: int) -> tuple[dict, list]:
    """Boxes drawn from a small integer pool: identical boxes, equal IoUs, boundary areas."""
    rng = np.random.default_rng(10_000 + seed)
    pool = [[float(x), float(y), float(w), float(h)]
            for x in (0, 3) for y in (0, 4) for w in (8, 32, 40) for h in (10, 32, 100)]
    images, cats = [{"id": i} for i in (3, 1, 2)], [{"id": 7}, {"id": 2}]
    anns, dets = [], []
    for img in images:
        for _ in range(int(rng.integers(0, 14))):
            box = list(pool[int(rng.integers(len(pool)))])
            area = float(rng.choice([box[2] * box[3], 32.0**2, 96.0**2, 1023.0]))
            anns.append({"id": len(anns) + 1, "image_id": img["id"],
                         "category_id": int(rng.choice([7, 2])), "bbox": box, "area": area,
                         "iscrowd": int(rng.random() < 0.25)})
        for _ in range(int(rng.integers(0, 25))):
            dets.append({"image_id": img["id"], "category_id": int(rng.choice([7, 2])),
                         "bbox": list(pool[int(rng.integers(len(pool)))]),
                         "score": float(rng.choice([0.3, 0.6, 0.9]))})
    return {"images": images, "categories": cats, "annotations": anns}, dets


@pytest.mark.parametrize("start", range(0, 240, 40))
def test_random_cases_match_pycocotools(start):
    for seed in range(start, start + 40):
        gt, dets = random_case(seed)
        assert_same(gt, dets, context=f"random seed {seed}")


@pytest.mark.parametrize("start", range(0, 120, 40))
def test_tied_grid_cases_match_pycocotools(start):
    for seed in range(start, start + 40):
        gt, dets = grid_case(seed)
        assert_same(gt, dets, context=f"grid seed {seed}")


def test_category_subset_matches_pycocotools():
    for seed in range(10):
        gt, dets = random_case(seed)
        cat_ids = [c["id"] for c in gt["categories"]][:2]
        assert_same(gt, dets, cat_ids=cat_ids, context=f"seed {seed}")


def test_annotation_id_zero_quirk_matches_pycocotools():
    # pycocotools records matches by annotation id and reads id 0 as "no match"
    gt = copy.deepcopy(GOOD_GT)
    gt["annotations"][0]["id"] = 0
    with pytest.warns(UserWarning, match="id 0"):
        assert ours(gt, [GOOD_DET]).stats[0] == 0.0  # a perfect detection counts as a miss
    # "large" labels: the small detection matched to id 0 reads as unmatched, so it is ignored
    gt["annotations"][0]["area"] = 1e6
    gt["annotations"].append(dict(gt["annotations"][0], id=5, bbox=[20, 20, 5, 5]))
    dets = [GOOD_DET, dict(GOOD_DET, bbox=[20, 20, 5, 5], score=0.4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours(gt, dets).stats[5] == pytest.approx(51 / 101)  # APl: precision 1 to R=.5
        assert_same(gt, dets)
        for seed in range(20):
            gt, dets = random_case(seed)
            for i, ann in enumerate(gt["annotations"]):
                ann["id"] = i
            assert_same(gt, dets, context=f"seed {seed}")


def test_iou_bit_identical_to_pycocotools():
    rng = np.random.default_rng(0)
    d = np.round(rng.uniform(0, 50, (40, 4)), 3)
    g = np.round(rng.uniform(0, 50, (30, 4)), 3)
    crowd = rng.random(30) < 0.3
    ref = mask_utils.iou(d.tolist(), g.tolist(), crowd.astype(np.uint8).tolist())  # (40, 30)
    di, gi = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")
    got = bbox_iou_xywh(d[di.ravel()], g[gi.ravel()], crowd[gi.ravel()]).reshape(40, 30)
    assert (got == ref).all()
    assert (got > 0).any() and (got == 0).any()


def test_empty_predictions_give_zero_ap():
    gt, _ = random_case(5)
    res = ours(gt, [])
    assert_same(gt, [])
    has_gt = {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
    assert has_gt and res.stats[0] == 0.0
    for k, cat in enumerate(res.category_ids):
        assert res.ap_per_class[k] == (0.0 if cat in has_gt else -1.0)


def test_empty_ground_truth_gives_minus_one():
    gt, dets = random_case(6)
    gt["annotations"] = []
    res = ours(gt, dets)
    assert_same(gt, dets)
    assert (res.stats == -1).all() and (res.ap_per_class == -1).all()
    assert set(res.as_dict()) == {"AP", "AP50", "AP75", "APs", "APm", "APl",
                                  "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}


def test_hand_computed_case():
    # one class, two labels; detections: hit (0.9), miss (0.8), hit (0.7)
    gt = CocoGT.from_arrays(image_ids=[1], image_id=[1, 1], category_id=[0, 0],
                            bbox=[[0, 0, 10, 10], [20, 20, 10, 10]])
    dt = CocoDT.from_arrays(image_id=[1, 1, 1], category_id=[0, 0, 0],
                            bbox=[[0, 0, 10, 10], [50, 50, 5, 5], [20, 20, 10, 10]],
                            score=[0.9, 0.8, 0.7])
    res = evaluate_coco(gt, dt)
    # precision envelope: 1.0 up to recall .5, then 2/3 up to recall 1: 51 * 1 + 50 * 2/3
    expected = (51 + 50 * 2 / 3) / 101
    assert res.ap_per_class[0] == pytest.approx(expected, abs=1e-12)
    assert res.stats[6] == pytest.approx(0.5)  # AR1: the best detection finds one of two
    assert res.stats[8] == pytest.approx(1.0)


def test_unknown_detection_category_is_warned_and_not_evaluated():
    gt, dets = random_case(7)
    extra = dict(dets[0], category_id=999) if dets else None
    assert extra is not None
    with pytest.warns(UserWarning, match="1 detections have a category_id absent"):
        res = ours(gt, dets + [extra])
    np.testing.assert_array_equal(res.stats, ours(gt, dets).stats)


GOOD_GT = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5],
                            "area": 25, "iscrowd": 0}]}
GOOD_DET = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}


@pytest.mark.parametrize(
    "det, message",
    [
        ({"image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
         "'image_id' 9 is not an image"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}, "missing key 'score'"),
        ({"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}, "missing key 'category_id'"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 5], "score": 0.5},
         "negative width or height"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": "high"},
         "'score' must be a number"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5},
         "'bbox' must be a list of 4 numbers"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, "5", 5], "score": 0.5},
         "'bbox' must be a list of 4 numbers"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": float("nan")},
         "'score' must be finite"),
        ("not an object", "is not a JSON object"),
    ],
)
def test_bad_detection_names_the_entry(det, message):
    dets = [GOOD_DET, GOOD_DET, det]
    with pytest.raises(CocoFormatError) as err:
        load_coco_dt(dets, load_coco_gt(GOOD_GT))
    text = str(err.value)
    assert message in text and "detection #2" in text
    assert json.dumps(det)[:20] in text  # the entry's content is shown


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["annotations"].append(dict(d["annotations"][0], id=2, image_id=5)),
         "annotation #1"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0], id=2, category_id=4)),
         "'category_id' 4 is not in 'categories'"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate annotation id"),
        (lambda d: d["annotations"][0].pop("bbox"), "annotation #0"),
        (lambda d: d["annotations"][0].update(bbox=[0, 0, 5, -1]), "negative width or height"),
        (lambda d: d["annotations"][0].update(area="big"), "'area' must be a number"),
        (lambda d: d.pop("images"), "missing key 'images'"),
        (lambda d: d["images"].append({"name": "x"}), "image #2"),
    ],
)
def test_bad_ground_truth_names_the_entry(mutate, message):
    gt = copy.deepcopy(GOOD_GT)
    mutate(gt)
    with pytest.raises(CocoFormatError, match=message):
        load_coco_gt(gt)


def test_bad_files_name_file_and_line(tmp_path):
    bad = tmp_path / "dt.json"
    bad.write_text('[\n {"image_id": 1,\n  "score": }\n]\n')
    with pytest.raises(CocoFormatError, match=r"dt\.json: line 3"):
        load_coco_dt(bad, load_coco_gt(GOOD_GT))
    with pytest.raises(CocoFormatError, match="cannot read"):
        load_coco_gt(tmp_path / "missing.json")
    with pytest.raises(CocoFormatError, match="must be a JSON list"):
        load_coco_dt({"annotations": []}, load_coco_gt(GOOD_GT))


def test_optional_gt_fields_default():
    gt = {"images": [{"id": 1}],
          "annotations": [{"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}]}
    g = load_coco_gt(gt)  # no categories, area or iscrowd
    assert g.category_ids.tolist() == [3] and g.area.tolist() == [12.0]
    assert g.iscrowd.tolist() == [False]
