"""What a prediction is (`Detections`) and what a predict run writes.

Into the run folder: the annotated images (same file names), `labels/<stem>.txt` in YOLO format
(`cls cx cy w h [conf]`, normalised to the original image, one line per box, an empty file for an
image without detections), and one `predictions.json`: a COCO results list whose entries also carry
the image's `file_name` (image ids as `trainer.coco_export`: the numeric stems of COCO's own file
names, else positions 0..n-1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from trainer.coco_export import CocoExporter
from trainer.plots import draw_detections

SAVED_AS_IS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # other formats are written as .jpg


@dataclass(frozen=True, eq=False)
class Detections:
    """One image's detections, in its original pixels."""

    name: str  # the file or s3:// URI it came from, or "image<i>" for an array
    shape: tuple[int, int]  # original (h, w)
    boxes: np.ndarray  # (n, 4) float32 [x1, y1, x2, y2], clipped to the image
    scores: np.ndarray  # (n,) float32 objectness x class probability
    classes: np.ndarray  # (n,) int64 class indices
    names: tuple[str, ...]  # the model's class names

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def labels(self) -> list[str]:
        """Class names of the boxes, in order."""
        return [self.names[c] for c in self.classes.tolist()]

    def as_array(self) -> np.ndarray:
        """(n, 6) float64 [x1, y1, x2, y2, score, cls], the layout `trainer.validate` hands its hooks."""
        return np.concatenate((self.boxes, self.scores[:, None], self.classes[:, None]), axis=1).astype(np.float64)

    def yolo_lines(self, save_conf: bool = False) -> list[str]:
        """`cls cx cy w h [conf]` per box, normalised to the original image."""
        h, w = self.shape
        lines = []
        for (x1, y1, x2, y2), s, c in zip(self.boxes.tolist(), self.scores.tolist(), self.classes.tolist()):
            row = f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
            lines.append(row + (f" {s:.6f}" if save_conf else ""))
        return lines


class PredictionWriter:
    """Writes each image's outputs as it comes, and predictions.json at `close()`."""

    def __init__(self, out: Path, names: Sequence[str], save_conf: bool = False, save_images: bool = True):
        self.out, self.save_conf, self.save_images = Path(out), save_conf, save_images
        (self.out / "labels").mkdir(parents=True, exist_ok=True)
        self.coco = CocoExporter(names)
        self._stems: set[str] = set()
        self.written = 0

    def _unique(self, stem: str) -> str:
        """Images of different folders may share a name: the later ones get _2, _3, ..."""
        name, n = stem, 2
        while name in self._stems:
            name, n = f"{stem}_{n}", n + 1
        self._stems.add(name)
        return name

    def add(self, image: np.ndarray, det: Detections) -> str:
        """Write one image's label file (and annotated copy); returns the stem used."""
        base = det.name.rsplit("/", 1)[-1]
        stem = self._unique(Path(base).stem)
        lines = det.yolo_lines(self.save_conf)
        (self.out / "labels" / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        if self.save_images:
            suffix = Path(base).suffix.lower()
            target = self.out / f"{stem}{suffix if suffix in SAVED_AS_IS else '.jpg'}"
            if not cv2.imwrite(str(target), draw_detections(image, det.boxes, det.scores, det.classes, det.names)):
                raise OSError(f"could not write {target}")
        self.coco(det.name, det.as_array(), np.zeros((0, 5)), det.shape)
        self.written += 1
        return stem

    def close(self) -> Path:
        """Write predictions.json; returns its path."""
        files = {i: Path(p.rsplit("/", 1)[-1]).name for i, (p, _) in zip(self.coco.image_ids(), self.coco.images)}
        rows = [{"image_id": r["image_id"], "file_name": files[r["image_id"]], **{k: r[k] for k in
                 ("category_id", "bbox", "score")}} for r in self.coco.detections()]
        path = self.out / "predictions.json"
        path.write_text(json.dumps(rows))
        return path
