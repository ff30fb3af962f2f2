"""COCO JSON from a validation pass: ground truth built from the YOLO labels, and detections as a
COCO results list, both in original image pixels, so any COCO tool can score them.

Category ids are the dataset's class indices (0..nc-1) in both files. Image ids are the file
stems when every stem is a distinct integer (COCO's own file names), else positions 0..n-1.
Annotation ids start at 1: pycocotools treats an annotation id of 0 as "no match".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


def _xywh(boxes: np.ndarray) -> np.ndarray:
    out = boxes.astype(np.float64).copy()
    out[:, 2:] -= out[:, :2]
    return out


class CocoExporter:
    """An `ImageHook` for `run_validation` that keeps what it needs to write both files."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.images: list[tuple[str, tuple[int, int] | None]] = []
        self.preds: list[np.ndarray] = []
        self.gts: list[np.ndarray] = []

    def __call__(self, path: str, preds: np.ndarray, gts: np.ndarray, hw: tuple[int, int] | None) -> None:
        self.images.append((path, hw))
        self.preds.append(np.asarray(preds, dtype=np.float64).reshape(-1, 6))
        self.gts.append(np.asarray(gts, dtype=np.float64).reshape(-1, 5))

    def image_ids(self) -> list[int]:
        stems = [Path(p).stem for p, _ in self.images]
        if all(s.isdigit() for s in stems) and len(set(map(int, stems))) == len(stems):
            return [int(s) for s in stems]
        return list(range(len(stems)))

    def ground_truth(self) -> dict:
        ids = self.image_ids()
        images, annotations = [], []
        for img_id, (path, hw), gts in zip(ids, self.images, self.gts):
            h, w = hw if hw is not None else (0, 0)
            images.append({"id": img_id, "file_name": Path(path).name, "height": int(h), "width": int(w)})
            for cls, box in zip(gts[:, 0], _xywh(gts[:, 1:5])):
                annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": int(cls),
                                    "bbox": [round(float(v), 4) for v in box],
                                    "area": round(float(box[2] * box[3]), 4), "iscrowd": 0})
        categories = [{"id": c, "name": n} for c, n in enumerate(self.names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def detections(self) -> list[dict]:
        out = []
        for img_id, preds in zip(self.image_ids(), self.preds):
            for row, box in zip(preds, _xywh(preds[:, :4])):
                out.append({"image_id": img_id, "category_id": int(row[5]),
                            "bbox": [round(float(v), 4) for v in box], "score": round(float(row[4]), 6)})
        return out

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write gt.json and predictions.json into `folder`; returns their paths."""
        gt_path, dt_path = folder / "gt.json", folder / "predictions.json"
        gt_path.write_text(json.dumps(self.ground_truth()))
        dt_path.write_text(json.dumps(self.detections()))
        return gt_path, dt_path
