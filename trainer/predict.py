"""Run a trained detector on images: annotated copies, YOLO label files and COCO-style JSON.

    python -m trainer.predict --weights runs/train/exp/weights/best.pt --source path/to/images
    python -m trainer.predict --weights ../shared/weights/yolov5n.pt --source 'photos/**/*.jpg' --imgsz 640
    python -m trainer.predict --weights model.onnx --source s3://bucket/incoming/ --save-conf --device cpu

`--weights` is a kfyolo checkpoint, an official ultralytics YOLOv5 `.pt` (read without executing its
pickle), an `.onnx` model (run by ONNX Runtime, no PyTorch model involved) or a `.torchscript` file,
both from `python -m trainer.export`. `--source` is an image, a folder (recursive), a glob, a `.txt`
list of paths or `s3://bucket/prefix` (credentials from the environment, see trainer/storage.py).
Each image is letterboxed as validation letterboxes it and its boxes mapped back to its own pixels,
so the detections are `trainer.evaluate`'s at the same thresholds. Writes into runs/predict/exp
(exp2, ...): annotated images, labels/<stem>.txt (`--save-conf` adds the score column) and
predictions.json. An unreadable image is reported on one line naming it, listed in skipped.txt and
counted in the summary; the rest go on.

From Python (paths, s3:// URIs or OpenCV BGR arrays):

    from trainer.predict import Predictor
    for det in Predictor("best.pt", imgsz=640).predict(["a.jpg", bgr_array]):
        print(det.name, det.boxes, det.scores, det.labels)   # (n, 4) xyxy original pixels, (n,), names
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from trainer import __version__
from trainer.checkpoint import CheckpointError
from trainer.distributed import DistributedError, select_device
from trainer.fit import next_run_dir
from trainer.inference.preprocess import ImageError, Letterboxed, as_bgr, prepare
from trainer.inference.results import Detections, PredictionWriter
from trainer.inference.runtime import RuntimeSetupError, Session, open_session
from trainer.inference.sources import ImageReader, SourceError, SourceItem, expand_source
from trainer.models.foreign_pickle import UnsafePickleError
from trainer.ops.boxes import scale_boxes_to_original
from trainer.ops.nms import non_max_suppression
from trainer.storage import StorageError

__all__ = ["Detections", "Predictor", "PredictOptions", "predict", "main"]
log = logging.getLogger("trainer")
Frame = tuple[str, np.ndarray]  # (name, (H, W, 3) BGR uint8)


class Predictor:
    """Weights in, `Detections` out: letterbox -> runtime session -> NMS -> original pixels.

    Every runtime (checkpoint, TorchScript, ONNX Runtime) shares the steps around the session.
    `classes` (indices or names) keeps only those classes: the others are not scored, so a box is
    labelled with its best class among them. `multi_label` keeps a box once per class over
    `conf_thres`, as `trainer.evaluate` does for mAP."""

    def __init__(self, weights: str | Path, imgsz: int = 640, conf_thres: float = 0.25, iou_thres: float = 0.45,
                 max_det: int = 300, classes: Sequence[int | str] | None = None, device: str = "",
                 batch_size: int = 1, amp: str = "auto", multi_label: bool = False, agnostic: bool = False,
                 memory_format: str = "channels_last", threads: int = 0):
        for ok, msg in ((0 <= conf_thres < 1, f"--conf-thres {conf_thres} must be in [0, 1)"),
                        (0 < iou_thres <= 1, f"--iou-thres {iou_thres} must be in (0, 1]"),
                        (max_det >= 1, "--max-det must be >= 1"), (batch_size >= 1, "--batch-size must be >= 1"),
                        (imgsz >= 32, "--imgsz must be >= 32")):
            if not ok:
                raise ValueError(msg)
        self.conf_thres, self.iou_thres, self.max_det = conf_thres, iou_thres, max_det
        self.batch_size, self.multi_label, self.agnostic = batch_size, multi_label, agnostic
        self.session: Session = open_session(weights, select_device(device), amp, memory_format, threads)
        self.names: tuple[str, ...] = tuple(self.session.names)
        self.stride = self.session.stride
        fixed = self.session.fixed_hw
        if fixed is not None and imgsz != max(fixed):
            log.info("%s takes %dx%d inputs only: --imgsz %d becomes %d", weights, *fixed, imgsz, max(fixed))
            imgsz = max(fixed)
        elif fixed is None and imgsz % self.stride:
            raise ValueError(f"--imgsz {imgsz} must be a multiple of the model's max stride {self.stride}")
        self.imgsz = imgsz
        self.keep = self._class_mask(classes)

    def _class_mask(self, classes: Sequence[int | str] | None) -> torch.Tensor | None:
        """(nc,) bool of the classes to score, from indices or names; None keeps them all."""
        if not classes:
            return None
        keep = torch.zeros(len(self.names), dtype=torch.bool)
        for c in classes:
            text = str(c)
            index = int(text) if text.isdigit() else self.names.index(text) if text in self.names else -1
            if not 0 <= index < len(self.names):
                raise ValueError(f"--classes {c}: not a class index (0-{len(self.names) - 1}) or name of this model")
            keep[index] = True
        return keep

    def preprocess(self, image: np.ndarray) -> Letterboxed:
        """(H, W, 3) BGR -> the model input validation would make of it."""
        return prepare(image, self.imgsz, self.stride, self.session.fixed_hw)

    def postprocess(self, pred: torch.Tensor, inputs: Sequence[Letterboxed], names: Sequence[str]) -> list[Detections]:
        """(B, N, 5 + nc) decoded predictions -> per-image detections in original pixels."""
        if self.keep is not None:
            pred = pred.clone()
            pred[..., 5:][..., ~self.keep.to(pred.device)] = 0  # unscored classes never pass conf_thres
        dets = non_max_suppression(pred, self.conf_thres, self.iou_thres, multi_label=self.multi_label,
                                   agnostic=self.agnostic, max_det=self.max_det)  # B x (n, 6) on the input
        out = []
        for det, lb, name in zip(dets, inputs, names):
            det = det.clone()
            scale_boxes_to_original(det[:, :4], lb.ratio_pad, lb.original_hw)
            det = det.cpu().numpy()
            out.append(Detections(name, lb.original_hw, det[:, :4].astype(np.float32), det[:, 4].astype(np.float32),
                                  det[:, 5].astype(np.int64), self.names))
        return out

    def stream(self, frames: Iterable[Frame]) -> Iterator[tuple[str, np.ndarray, Detections]]:
        """Detections for frames as they come, in order. Consecutive images with the same input shape
        share a batch (up to batch_size); a new shape starts the next, so results never depend on
        what else was in the batch's padding."""
        pending: list[tuple[str, np.ndarray, Letterboxed]] = []
        for name, image in frames:
            lb = self.preprocess(image)
            if pending and (len(pending) == self.batch_size or pending[0][2].chw.shape != lb.chw.shape):
                yield from self._run(pending)
                pending = []
            pending.append((name, image, lb))
        if pending:
            yield from self._run(pending)

    def _run(self, batch: list[tuple[str, np.ndarray, Letterboxed]]) -> Iterator[tuple[str, np.ndarray, Detections]]:
        pred = self.session(np.stack([lb.chw for _, _, lb in batch]))  # (B, N, 5 + nc)
        dets = self.postprocess(pred, [lb for _, _, lb in batch], [name for name, _, _ in batch])
        for (name, image, _), det in zip(batch, dets):
            yield name, image, det

    def predict(self, images: str | Path | np.ndarray | Sequence[str | Path | np.ndarray]) -> list[Detections]:
        """Detections for images given as paths, s3:// URIs or BGR arrays (one or a list), in order.
        An unreadable image raises ImageError naming it."""
        items = [images] if isinstance(images, (str, Path, np.ndarray)) else list(images)
        reader = ImageReader()

        def frames() -> Iterator[Frame]:
            for i, item in enumerate(items):
                if isinstance(item, np.ndarray):
                    yield f"image{i}", as_bgr(item, f"image {i}")
                else:
                    yield str(item), reader.read(SourceItem(str(item)))
        try:
            return [det for _, _, det in self.stream(frames())]
        finally:
            reader.close()


@dataclass(frozen=True)
class PredictOptions:
    weights: str
    source: str | tuple[str, ...]
    imgsz: int = 640
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 300
    classes: tuple[str, ...] = ()
    device: str = ""
    batch_size: int = 1
    amp: str = "auto"
    save_conf: bool = False
    save_images: bool = True
    multi_label: bool = False
    agnostic: bool = False
    threads: int = 0
    project: str = "runs/predict"
    name: str = "exp"
    exist_ok: bool = False


def predict(opt: PredictOptions) -> dict[str, Any]:
    """The CLI's work: list the source, run every image, write the outputs; returns a summary dict."""
    items = expand_source(opt.source)  # before the model loads: a wrong source fails at once
    predictor = Predictor(opt.weights, opt.imgsz, opt.conf_thres, opt.iou_thres, opt.max_det, opt.classes or None,
                          opt.device, opt.batch_size, opt.amp, opt.multi_label, opt.agnostic, threads=opt.threads)
    out = next_run_dir(Path(opt.project), opt.name, opt.exist_ok)
    writer = PredictionWriter(out, predictor.names, opt.save_conf, opt.save_images)
    reader, skipped, counts = ImageReader(), [], Counter()
    bar = tqdm(total=len(items), desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True)

    def frames() -> Iterator[Frame]:
        for item in items:
            try:
                image = reader.read(item)
            except ImageError as e:
                skipped.append(str(e))
                bar.write(f"skipped {e}", file=sys.stderr)
                bar.update(1)
                continue
            yield item.name, image

    started = time.perf_counter()
    try:
        for _, image, det in predictor.stream(frames()):
            writer.add(image, det)
            counts.update(det.labels)
            bar.update(1)
    finally:
        bar.close()
        reader.close()
    seconds = time.perf_counter() - started
    json_path = writer.close()
    if skipped:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    found = ", ".join(f"{n} {name}" for name, n in counts.most_common(8)) or "nothing"
    more = f", ... {len(counts) - 8} more classes" if len(counts) > 8 else ""
    print(f"{writer.written} images, {sum(counts.values())} detections ({found}{more}), {len(skipped)} skipped; "
          f"{seconds:.1f} s ({writer.written / max(seconds, 1e-9):.1f} img/s, {predictor.session.kind}); "
          f"results in {out}", flush=True)
    return {"output": str(out), "predictions": str(json_path), "images": writer.written, "skipped": skipped,
            "detections": sum(counts.values()), "seconds": seconds}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--weights", required=True, help="kfyolo checkpoint, ultralytics YOLOv5 .pt, .onnx or .torchscript")
    a("--version", action="version", version=f"kfyolo {__version__}")
    a("--source", required=True, nargs="+", help="image, folder, glob, .txt list or s3://bucket/prefix (several allowed)")
    a("--imgsz", "--img-size", "--img", dest="imgsz", type=int, default=640, help="long side of the model input")
    a("--conf-thres", type=float, default=0.25)
    a("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    a("--max-det", type=int, default=300, help="at most this many boxes per image")
    a("--classes", nargs="+", default=[], help="keep only these classes (indices or names)")
    a("--device", default="", help="cpu, a CUDA index, or empty for auto")
    a("--batch-size", type=int, default=1, help="images per forward pass (same-shape neighbours batch together)")
    a("--amp", default="auto", choices=["auto", "fp16", "bf16", "off"], help="checkpoints only: autocast precision")
    a("--half", dest="amp", action="store_const", const="fp16", help="same as --amp fp16 (CUDA)")
    a("--save-conf", action="store_true", help="add the score column to labels/*.txt")
    a("--no-images", dest="save_images", action="store_false", help="write no annotated images")
    a("--multi-label", action="store_true", help="keep a box once per class over --conf-thres (as for mAP)")
    a("--agnostic-nms", dest="agnostic", action="store_true", help="NMS across classes")
    a("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    a("--project", default="runs/predict")
    a("--name", default="exp")
    a("--exist-ok", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    opts = vars(args)
    opts["source"], opts["classes"] = tuple(args.source), tuple(args.classes)
    try:
        result = predict(PredictOptions(**opts))
    except (ValueError, SourceError, ImageError, RuntimeSetupError, CheckpointError, UnsafePickleError,
            DistributedError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result["images"]:
        print(f"error: no image of --source {' '.join(args.source)} could be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from trainer.runlog import run_cli

    run_cli(main)
