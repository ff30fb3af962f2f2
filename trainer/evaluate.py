"""Evaluate a detector on a split with COCO-exact metrics.

    python -m trainer.evaluate --data ../shared/datasets/coco128/coco128.yaml --weights ../shared/weights/yolov5n.pt \\
        --imgsz 640 --device cpu [--save-json] [--task val|test]

Weights are a kfyolo checkpoint or an official ultralytics YOLOv5 `.pt` (read without executing
its pickled code). Prints P, R, mAP@.5 and mAP@.5:.95 overall and per class, and writes into the
output folder (runs/val/exp, exp2, ...):

    metrics.json        overall metrics, the 12 COCO stats, per-class P/R/AP
    maps.json           per-class AP@.5:.95 (classes without labels: the mean), for --maps
    pr_curve.png, confusion_matrix.png, val_batch{0,1,2}_labels.jpg / _pred.jpg
    gt.json, predictions.json   with --save-json: COCO files any COCO tool can score
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer import __version__
from trainer import plots
from trainer.amp import resolve_precision
from trainer.checkpoint import CheckpointError
from trainer.coco_export import CocoExporter
from trainer.data.config import DataConfigError, load_data_config
from trainer.data.dataset import YoloDataset, single_threaded_opencv
from trainer.data.labels import DatasetError
from trainer.distributed import DistributedError, select_device
from trainer.fit import available_cpus, memory_format, next_run_dir
from trainer.metrics.coco import STAT_KEYS
from trainer.metrics.confusion import ConfusionMatrix
from trainer.models.foreign_pickle import UnsafePickleError
from trainer.models.pretrained import model_from_weights
from trainer.validate import run_validation

log = logging.getLogger("trainer")
PLOTTED_BATCHES = 3


@dataclass(frozen=True)
class EvalOptions:
    data: str
    weights: str
    imgsz: int = 640
    batch_size: int = 32
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    device: str = ""
    task: str = "val"
    save_json: bool = False
    workers: int = 4
    amp: str = "auto"
    memory_format: str = "channels_last"
    project: str = "runs/val"
    name: str = "exp"
    exist_ok: bool = False
    plots: bool = True


class BatchPlotter:
    """The first batches as labelled and predicted pictures, drawn on a thread beside the loop
    (OpenCV drawing releases the GIL), so the loop's time is the model's. close() waits for them;
    a picture that fails is a warning, never the end of an evaluation."""

    def __init__(self, out: Path, names: Sequence[str]):
        self.out, self.names = out, list(names)
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: list[Future] = []

    def __call__(self, bi: int, imgs: torch.Tensor, targets: torch.Tensor, dets: list[torch.Tensor],
                 paths: Sequence[str], shapes: Sequence[Any]) -> None:
        if bi >= PLOTTED_BATCHES:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plots")
        self._jobs.append(self._pool.submit(self._draw, bi, imgs, targets, dets, list(paths)))

    def _draw(self, bi: int, imgs: torch.Tensor, targets: torch.Tensor, dets: list[torch.Tensor],
              paths: list[str]) -> None:
        plots.plot_images(imgs, targets, paths, self.names, self.out / f"val_batch{bi}_labels.jpg")
        preds = plots.detections_as_targets(dets, tuple(imgs.shape[2:]))
        plots.plot_images(imgs, preds, paths, self.names, self.out / f"val_batch{bi}_pred.jpg")

    def close(self) -> None:
        for job in self._jobs:
            try:
                job.result()
            except Exception as e:
                log.warning("a validation batch picture failed: %s: %s", type(e).__name__, e)
        self._jobs = []
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _fanout(*hooks):
    def call(*args):
        for h in hooks:
            h(*args)
    return call


def evaluate(opt: EvalOptions) -> dict[str, Any]:
    """Run the evaluation; returns the metrics dict (also written to metrics.json)."""
    for ok, msg in ((opt.imgsz >= 32, "--imgsz must be >= 32"), (opt.batch_size >= 1, "--batch-size must be >= 1"),
                    (0 <= opt.conf_thres < 1 and 0 < opt.iou_thres <= 1, "--conf-thres/--iou-thres out of range"),
                    (opt.task in ("val", "test", "train"), "--task must be val, test or train")):
        if not ok:
            raise ValueError(msg)
    data = load_data_config(opt.data)
    device = select_device(opt.device)
    model, source = model_from_weights(opt.weights)
    names = list(data.names)
    if model.nc != len(names):
        raise CheckpointError(f"{opt.weights}: the model predicts {model.nc} classes, {opt.data} has {len(names)}")
    stride = max(int(model.stride.max()), 32)
    if opt.imgsz % stride:
        raise ValueError(f"--imgsz {opt.imgsz} must be a multiple of the model's max stride {stride}")
    dataset = YoloDataset.from_config(data, opt.task, img_size=opt.imgsz, batch_size=opt.batch_size,
                                      rect=True, stride=stride, pad=0.5, workers=available_cpus())
    log.info("%s", dataset.report.summary())
    workers = min(opt.workers, available_cpus())
    if workers:
        single_threaded_opencv()
    loader = DataLoader(dataset, batch_size=opt.batch_size, shuffle=False, collate_fn=YoloDataset.collate_fn,
                        num_workers=workers, pin_memory=device.type == "cuda")
    out = next_run_dir(Path(opt.project), opt.name, opt.exist_ok)
    out.mkdir(parents=True, exist_ok=True)

    confusion = ConfusionMatrix(len(names))
    exporter = CocoExporter(names)
    on_image = _fanout(lambda path, p, g, hw: confusion.update(p, g), *([exporter] if opt.save_json else []))
    started = time.perf_counter()
    model = model.to(device, memory_format=memory_format(opt.memory_format))
    plotter = BatchPlotter(out, names) if opt.plots else None
    try:
        metrics = run_validation(model, loader, device, names, resolve_precision(opt.amp, device),
                                 conf_thres=opt.conf_thres, iou_thres=opt.iou_thres, max_det=opt.max_det,
                                 on_batch=plotter, on_image=on_image)
        seconds = time.perf_counter() - started
    finally:
        if plotter is not None:
            plotter.close()
    record = metrics_record(metrics, names, opt, source.origin, seconds)
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    (out / "maps.json").write_text(json.dumps({"names": names, "maps": record["maps"]}, indent=1))
    if opt.save_json:
        exporter.write(out)
    if opt.plots:
        plots.plot_pr_curve(metrics["pr_curve"]["recall"], metrics["pr_curve"]["precision"],
                            np.asarray(metrics["ap50_per_class"]), names, out / "pr_curve.png")
        plots.plot_confusion_matrix(confusion.matrix, names, out / "confusion_matrix.png")
    print_table(metrics, names, len(dataset))
    log.info("%.1f s for %d images (%.1f ms/image); results in %s", seconds, len(dataset),
             1000 * seconds / max(len(dataset), 1), out)
    record["output"] = str(out)
    return record


def metrics_record(m: dict[str, Any], names: list[str], opt: EvalOptions, origin: str, seconds: float) -> dict:
    per_class = []
    for c, name in enumerate(names):
        per_class.append({"class": name, "labels": int(m["n_gt_per_class"][c]), "precision": float(m["p_per_class"][c]),
                          "recall": float(m["r_per_class"][c]), "ap50": float(m["ap50_per_class"][c]),
                          "ap": float(m["ap_per_class"][c])})
    return {
        "data": opt.data, "weights": opt.weights, "weights_format": origin, "task": opt.task, "imgsz": opt.imgsz,
        "conf_thres": opt.conf_thres, "iou_thres": opt.iou_thres, "images": int(m["n_images"]),
        "precision": m["precision"], "recall": m["recall"], "map50": m["map50"], "map": m["map"],
        "best_conf": m["best_conf"], "coco": dict(zip(STAT_KEYS, (float(s) for s in m["coco_stats"]))),
        "maps": [float(x) for x in m["maps"]], "per_class": per_class, "seconds": round(seconds, 3),
    }


def print_table(m: dict[str, Any], names: list[str], n_images: int) -> None:
    head = ("Class", "Images", "Labels", "P", "R", "mAP@.5", "mAP@.5:.95")
    row = "%22s" + "%11s" * 2 + "%11.3g" * 4
    lines = [("%22s" + "%11s" * 6) % head,
             row % ("all", n_images, int(np.sum(m["n_gt_per_class"])), m["precision"], m["recall"], m["map50"], m["map"])]
    for c, name in enumerate(names):
        if m["n_gt_per_class"][c] > 0:
            lines.append(row % (name[:22], "", int(m["n_gt_per_class"][c]), m["p_per_class"][c], m["r_per_class"][c],
                                m["ap50_per_class"][c], m["ap_per_class"][c]))
    print("\n".join(lines), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kfyolo {__version__}")
    a = p.add_argument
    a("--data", required=True, help="data YAML")
    a("--weights", required=True, help="kfyolo checkpoint or ultralytics YOLOv5 .pt")
    a("--imgsz", "--img-size", "--img", dest="imgsz", type=int, default=640)
    a("--batch-size", type=int, default=32)
    a("--conf-thres", type=float, default=0.001)
    a("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    a("--max-det", type=int, default=300)
    a("--device", default="", help="cpu, a CUDA index, or empty for auto")
    a("--task", default="val", choices=["val", "test", "train"], help="which split to evaluate")
    a("--save-json", action="store_true", help="also write gt.json and predictions.json (COCO format)")
    a("--workers", type=int, default=4)
    a("--amp", default="auto", choices=["auto", "fp16", "bf16", "off"])
    a("--memory-format", default="channels_last", choices=["channels_last", "contiguous"])
    a("--project", default="runs/val")
    a("--name", default="exp")
    a("--exist-ok", action="store_true")
    a("--no-plots", dest="plots", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    try:
        evaluate(EvalOptions(**vars(args)))
    except (ValueError, DataConfigError, DatasetError, CheckpointError, UnsafePickleError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from trainer.runlog import run_cli

    run_cli(main)
