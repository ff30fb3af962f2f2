"""The side-by-side bench's box-mapping rescorers (bench/bench_vs_yolov5.py) against the mappings
they stand for: kfyolo's own (trainer.ops.boxes.scale_boxes_to_original, the padding applied) and
YOLOv5's (half the total padding, the height ratio for both axes), on a letterbox whose vertical
padding is odd, where the two part by half a pixel on the network input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data.augment import letterbox
from trainer.ops.boxes import scale_boxes_to_original

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_vs_yolov5 import remap_exact_way, remap_yolov5_way  # noqa: E402

H0, W0 = 333, 500  # resized by 0.64 to 320 x 213: 43 rows of padding to 256, an odd total


def _xywh(xyxy: list[float]) -> list[float]:
    return [xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]]


@pytest.fixture(scope="module")
def case() -> dict:
    out, (rw, rh), (padw, padh) = letterbox(np.zeros((H0, W0, 3), np.uint8), (256, 320))
    height, width = out.shape[:2]
    used_w, used_h = round(W0 * rw), round(H0 * rh)
    assert (height - used_h) % 2 == 1  # the case that tells the two mappings apart
    on_input = [40.3, 50.7, 200.2, 180.9]  # xyxy on the network input, well inside the image
    ours = scale_boxes_to_original(torch.tensor([on_input], dtype=torch.float64), ((rh, rw), (padw, padh)),
                                   (H0, W0))[0].tolist()
    dw2, dh2 = (width - used_w) / 2, (height - used_h) / 2
    theirs = [(on_input[0] - dw2) / rh, (on_input[1] - dh2) / rh, (on_input[2] - dw2) / rh, (on_input[3] - dh2) / rh]
    return {"params": {7: (rh, rw, padw, padh, dw2, dh2)}, "ours": ours, "theirs": theirs, "rh": rh}


def test_the_two_mappings_differ_by_half_an_input_pixel(case: dict) -> None:
    shift = np.subtract(case["ours"], case["theirs"])
    np.testing.assert_allclose(shift[[1, 3]], 0.5 / case["rh"], rtol=1e-9)


def test_yolov5_way_maps_kfyolo_boxes_as_yolov5_would(case: dict) -> None:
    det = {"image_id": 7, "category_id": 1, "score": 0.9, "bbox": _xywh(case["ours"])}
    (moved,) = remap_yolov5_way([det], case["params"])
    np.testing.assert_allclose(moved["bbox"], _xywh(case["theirs"]), atol=1e-9)
    assert {k: v for k, v in moved.items() if k != "bbox"} == {k: v for k, v in det.items() if k != "bbox"}


def test_exact_way_maps_yolov5_boxes_as_kfyolo_would(case: dict) -> None:
    det = {"image_id": 7, "category_id": 1, "score": 0.9, "bbox": _xywh(case["theirs"])}
    (moved,) = remap_exact_way([det], case["params"])
    np.testing.assert_allclose(moved["bbox"], _xywh(case["ours"]), atol=1e-9)


def test_the_rescorers_undo_each_other_and_keep_empty_lists_empty(case: dict) -> None:
    rng = np.random.default_rng(0)
    dets = [{"image_id": 7, "category_id": 3, "score": 0.5, "bbox": [*rng.uniform(0, 200, 2), *rng.uniform(1, 100, 2)]}
            for _ in range(20)]
    back = remap_exact_way(remap_yolov5_way(dets, case["params"]), case["params"])
    np.testing.assert_allclose([d["bbox"] for d in back], [d["bbox"] for d in dets], atol=1e-9)
    assert remap_yolov5_way([], case["params"]) == [] and remap_exact_way([], case["params"]) == []
