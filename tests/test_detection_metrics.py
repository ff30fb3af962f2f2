"""DetectionMetrics (COCO mAP, maps, P/R at best F1) and ConfusionMatrix."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.metrics.confusion import ConfusionMatrix
from trainer.metrics.detection import DetectionMetrics, fitness


def random_images(seed: int, n_img: int, nc: int):
    """Per image (preds (N, 6), gts (M, 5)), coordinates on a 1/4-pixel grid (exact in float32)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_img):
        m = int(rng.integers(0, 8))
        xy = rng.integers(0, 1200, (m, 2)) / 4
        wh = rng.integers(4, 800, (m, 2)) / 4
        gts = np.column_stack([rng.integers(0, nc, m), xy, xy + wh])
        n = int(rng.integers(0, 15))
        src = rng.integers(0, max(m, 1), n)
        boxes = np.column_stack(
            [rng.integers(0, 1200, (n, 2)) / 4, rng.integers(4, 800, (n, 2)) / 4]
        )
        boxes[:, 2:] += boxes[:, :2]
        cls = rng.integers(0, nc, n)
        if m:
            near = rng.random(n) < 0.7
            jitter = gts[src, 1:] + np.round(rng.normal(0, 8, (n, 4))) / 4
            jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2])
            boxes = np.where(near[:, None], jitter, boxes)
            cls = np.where(near, gts[src, 0], cls)
        conf = np.round(rng.random(n), 2)
        out.append((np.column_stack([boxes, conf, cls]), gts))
    return out


def pycoco_stats(images, nc: int) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' 12 stats and precision for the same images (area = box area)."""
    anns, dets = [], []
    for i, (p, g) in enumerate(images):
        for c, x1, y1, x2, y2 in g:
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c),
                         "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
        for x1, y1, x2, y2, s, c in p:
            dets.append({"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(len(images))], "annotations": anns,
                      "categories": [{"id": c} for c in range(nc)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), ev.eval["precision"]


def metrics_for(images, nc: int) -> dict:
    m = DetectionMetrics(nc)
    for p, g in images:
        m.update(p, g)
    return m.compute()


def test_matches_pycocotools_on_random_images():
    for seed in range(5):
        images = random_images(seed, 12, 4)
        ref_stats, ref_p = pycoco_stats(images, 4)
        res = metrics_for(images, 4)
        np.testing.assert_allclose(res["coco_stats"], ref_stats, atol=1e-6, rtol=0)
        assert res["map"] == pytest.approx(max(ref_stats[0], 0), abs=1e-6)
        assert res["map50"] == pytest.approx(max(ref_stats[1], 0), abs=1e-6)
        for c in range(4):
            s = ref_p[0, :, c, 0, 2]
            ap50 = s[s > -1].mean() if (s > -1).any() else -1
            assert res["ap50_per_class"][c] == pytest.approx(ap50, abs=1e-6)


def test_perfect_predictions():
    _, images = zip(*random_images(1, 6, 3))
    images = [g for g in images]
    images[0] = np.array([[0, 0, 0, 10, 10], [1, 50, 50, 90, 80], [2, 5, 5, 300, 200]])
    m = DetectionMetrics(3, names=["a", "b", "c"])
    for g in images:
        preds = np.column_stack([g[:, 1:5], np.full(len(g), 0.9), g[:, 0]])
        m.update(torch.as_tensor(preds), torch.as_tensor(g))
    res = m.compute()
    assert res["map"] == 1.0 and res["map50"] == 1.0
    np.testing.assert_array_equal(res["maps"], np.ones(3))
    assert res["precision"] == pytest.approx(1.0) and res["recall"] == pytest.approx(1.0)
    assert fitness(res) == pytest.approx(1.0)
    assert res["names"] == ["a", "b", "c"]


def test_class_without_labels_gets_the_mean():
    gts = np.array([[0, 0, 0, 10, 10], [1, 20, 20, 40, 40], [1, 60, 60, 80, 80]])
    preds = np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 40, 40, 0.8, 1]])  # finds 1 of class 1's 2
    m = DetectionMetrics(3)
    m.update(preds, gts)
    res = m.compute()
    ap1 = 51 / 101  # precision 1 up to recall 0.5, nothing beyond
    np.testing.assert_allclose(res["ap_per_class"], [1.0, ap1, -1.0])
    np.testing.assert_allclose(res["maps"], [1.0, ap1, (1.0 + ap1) / 2])
    assert res["n_gt_per_class"].tolist() == [1, 2, 0]


def test_precision_recall_at_best_f1():
    # one class, 3 labels; detections: hit 0.9, false 0.8, hit 0.7, false 0.2
    gts = np.array([[0, 0, 0, 10, 10], [0, 20, 0, 30, 10], [0, 40, 0, 50, 10]])
    preds = np.array([[0, 0, 10, 10, 0.9, 0], [100, 0, 110, 10, 0.8, 0],
                      [20, 0, 30, 10, 0.7, 0], [200, 0, 210, 10, 0.2, 0]])
    m = DetectionMetrics(1)
    m.update(preds, gts)
    res = m.compute()
    # F1 peaks just below conf 0.7 (P = R = 2/3); below 0.2 precision falls to 1/2
    assert res["best_conf"] == pytest.approx(0.7, abs=1e-3)
    assert res["precision"] == pytest.approx(2 / 3, abs=1e-3)
    assert res["recall"] == pytest.approx(2 / 3, abs=1e-3)
    assert res["p_per_class"][0] == pytest.approx(res["precision"])
    f1 = res["conf_curve"]["f1"]
    assert f1.shape == (1, 1000) and f1.max() == pytest.approx(2 / 3, abs=1e-3)
    assert res["pr_curve"]["precision"].shape == (1, 101)


def test_merge_of_halves_equals_one_shot():
    images = random_images(7, 10, 3)
    whole = metrics_for(images, 3)
    a, b, merged = DetectionMetrics(3), DetectionMetrics(3), DetectionMetrics(3)
    for i, (p, g) in enumerate(images):
        (a if i < 5 else b).update(p, g)
    merged.merge([a.state(), b.state()])
    res = merged.compute()
    for key in ("coco_stats", "maps", "ap_per_class", "p_per_class", "r_per_class"):
        np.testing.assert_array_equal(res[key], whole[key], err_msg=key)
    assert whole["map"] > 0
    with pytest.raises(ValueError, match="nc=4"):
        DetectionMetrics(3).merge([DetectionMetrics(4).state()])


@pytest.mark.parametrize("case", ["no images", "no labels", "no predictions"])
def test_degenerate_inputs(case):
    m = DetectionMetrics(2)
    if case == "no labels":
        m.update(np.array([[0, 0, 5, 5, 0.9, 1]]), np.zeros((0, 5)))
    elif case == "no predictions":
        m.update(torch.zeros((0, 6)), np.array([[1, 0, 0, 5, 5]]))
    res = m.compute()
    assert res["map"] == 0.0 and res["map50"] == 0.0 and fitness(res) == 0.0
    assert res["precision"] == 0.0 and res["recall"] == 0.0
    np.testing.assert_array_equal(res["maps"], np.zeros(2))
    m.reset()
    assert m.compute()["n_images"] == 0


def test_bad_updates_raise():
    m = DetectionMetrics(2)
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros((3, 5)), np.zeros((0, 5)))
    with pytest.raises(ValueError, match="class 2.0"):
        m.update(np.zeros((0, 6)), np.array([[2, 0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="x2 >= x1"):
        m.update(np.array([[5, 0, 1, 1, 0.5, 0]]), np.zeros((0, 5)))


def test_clip_to_image():
    m = DetectionMetrics(1)
    m.update(np.array([[-5, -5, 10, 10, 0.9, 0]]), np.array([[0, 0, 0, 10, 10]]),
             image_shape_hw=(8, 20))
    assert m.state()["preds"][0][0, :4].tolist() == [0, 0, 10, 8]


# ConfusionMatrix: rows = predicted class, columns = true class, index nc = background


def test_confusion_matrix_hand_built():
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    gts = np.array([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [1, 50, 50, 60, 60]])
    preds = np.array([
        [0, 0, 10, 10, 0.9, 0],  # right class on label 0
        [20, 20, 30, 30, 0.8, 0],  # wrong class on label 1
        [80, 80, 90, 90, 0.7, 1],  # nothing there: false alarm
        [50, 50, 60, 60, 0.1, 1],  # below conf: dropped, so label 2 is missed
    ])
    cm.update(preds, torch.as_tensor(gts))
    expected = np.zeros((3, 3), int)
    expected[0, 0] = 1  # pred 0, true 0
    expected[0, 1] = 1  # pred 0, true 1
    expected[1, 2] = 1  # pred 1, background
    expected[2, 1] = 1  # missed true 1
    np.testing.assert_array_equal(cm.matrix, expected)


def test_confusion_matrix_greedy_by_iou():
    cm = ConfusionMatrix(nc=2, conf=0.0, iou_thres=0.3)
    # IoUs: det0-A 1.0, det1-A 0.5, det0-B 1/3, det1-B 0.2 (below 0.3). Pairs go by IoU, not
    # by confidence: det0-A is taken first although det1 scores higher, then A and det0 are used.
    gts = np.array([[0, 0, 0, 10, 10], [1, 5, 0, 15, 10]])
    preds = np.array([[0, 0, 10, 10, 0.5, 1], [0, 0, 10, 5, 0.9, 0]])
    cm.update(preds, gts)
    expected = np.zeros((3, 3), int)
    expected[1, 0] = 1  # det0 (class 1) on label A (class 0)
    expected[2, 1] = 1  # label B: its only pair (det0) is used, so missed
    expected[0, 2] = 1  # det1 (class 0): A already taken
    np.testing.assert_array_equal(cm.matrix, expected)


def test_confusion_matrix_empty_sides_and_threshold():
    cm = ConfusionMatrix(nc=3, conf=0.5, iou_thres=0.5)
    cm.update(np.zeros((0, 6)), np.array([[2, 0, 0, 1, 1], [2, 5, 5, 6, 6]]))
    cm.update(np.array([[0, 0, 1, 1, 0.5, 1]]), np.zeros((0, 5)))  # conf == threshold counts
    assert cm.matrix[3, 2] == 2 and cm.matrix[1, 3] == 1 and cm.matrix.sum() == 3
    cm.reset()
    # IoU exactly 0.5 is not above the threshold: a miss and a false alarm
    cm.update(np.array([[0, 0, 10, 10, 0.9, 0]]), np.array([[0, 0, 0, 10, 20]]))
    assert cm.matrix[0, 0] == 0 and cm.matrix[3, 0] == 1 and cm.matrix[0, 3] == 1


def test_confusion_plot_of_80_classes_is_readable(tmp_path):
    """COCO's 80 classes: the plot keeps the 29 classes with the most labels plus background, with
    names, instead of an unreadable 81 x 81 grid."""
    import cv2

    from trainer.plots import plot_confusion_matrix

    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 3, (81, 81)).astype(float)
    matrix[:, 5] += 100  # class 5 has by far the most labels: it must be shown
    out = plot_confusion_matrix(matrix, [f"class{k}" for k in range(80)], tmp_path / "cm.png")
    h, w = cv2.imread(str(out)).shape[:2]
    assert w < 2200 and h < 2200  # was 4614 x 4554
    small = plot_confusion_matrix(matrix[:4][:, :4], ["a", "b", "c"], tmp_path / "cm3.png")
    assert cv2.imread(str(small)) is not None
