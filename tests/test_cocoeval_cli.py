"""python -m trainer.cocoeval: summary layout and --json against pycocotools, bad files."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.cocoeval import main

KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def small_set(seed: int = 0) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for img in range(1, 6):
        for _ in range(int(rng.integers(1, 6))):
            w, h = (float(v) for v in rng.uniform(5, 200, 2))
            x, y = (float(v) for v in rng.uniform(0, 300, 2))
            cat = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            for _ in range(int(rng.integers(0, 3))):
                j = rng.normal(0, 0.1, 4) * [w, h, w, h]
                dets.append({"image_id": img, "category_id": cat, "score": float(rng.random()),
                             "bbox": [x + j[0], y + j[1], abs(w + j[2]), abs(h + j[3])]})
    gt = {"images": [{"id": i} for i in range(1, 6)], "annotations": anns,
          "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    return gt, dets


def write(tmp_path: Path, gt, dets) -> tuple[str, str]:
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(dets))
    return str(gt_path), str(dt_path)


def pycoco_summary(gt, dets) -> tuple[list[str], np.ndarray]:
    """pycocotools' printed summary lines and stats."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.summarize()
    return out.getvalue().splitlines(), np.asarray(ev.stats)


def test_summary_layout_matches_pycocotools(tmp_path, capsys):
    gt, dets = small_set()
    assert main(list(write(tmp_path, gt, dets))) == 0
    lines = capsys.readouterr().out.splitlines()
    ref_lines, _ = pycoco_summary(gt, dets)
    assert len(lines) == 12
    assert lines == ref_lines
    head = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = "
    assert lines[0].startswith(head)


def test_json_output_matches_pycocotools(tmp_path, capsys):
    gt, dets = small_set(1)
    assert main([*write(tmp_path, gt, dets), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    _, ref = pycoco_summary(gt, dets)
    assert list(got) == KEYS
    np.testing.assert_allclose([got[k] for k in KEYS], ref, atol=1e-12, rtol=0)


def test_json_reports_minus_one_when_undefined(tmp_path, capsys):
    gt, dets = small_set(2)
    gt["annotations"] = []
    assert main([*write(tmp_path, gt, dets), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out).values()) == {-1.0}


def test_bad_detection_file_exits_2_naming_the_entry(tmp_path, capsys):
    gt, dets = small_set()
    dets[3]["bbox"] = [1, 2, -3, 4]
    assert main(list(write(tmp_path, gt, dets))) == 2
    err = capsys.readouterr().err
    assert "dt.json: detection #3" in err and "negative width or height" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "text, message", [("{not json", "line 1"), ("[]", "must be a JSON object")]
)
def test_bad_ground_truth_file_exits_2(tmp_path, capsys, text, message):
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(text)
    dt_path.write_text("[]")
    assert main([str(gt_path), str(dt_path)]) == 2
    err = capsys.readouterr().err
    assert "gt.json" in err and message in err


def test_missing_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.json"), str(tmp_path / "dt.json")]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_runs_as_module(tmp_path):
    gt, dets = small_set()
    dets.append(dict(dets[0], category_id=99))  # an unknown category: warned, not fatal
    proc = subprocess.run([sys.executable, "-m", "trainer.cocoeval", *write(tmp_path, gt, dets),
                           "--json"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)) == KEYS
    assert "warning:" in proc.stderr and "category_id absent" in proc.stderr
