"""Benchmark: `trainer.predict` images/s on CPU through PyTorch and ONNX Runtime, beside `trainer.evaluate`.

    .venv/bin/python bench/bench_predict.py                        # COCO128 at 640, official yolov5n (../shared)
    .venv/bin/python bench/bench_predict.py --imgsz 320 --batch-size 8

Exports the weights to ONNX once (trainer.export, dynamic batch and size), then times
`Predictor.predict` over the images (read, letterbox, model, NMS, back to original pixels; no
files written) for the checkpoint and the ONNX file, each after a warm-up pass, and
`trainer.evaluate` over the same split (its loader, model and NMS at conf 0.001, and the metrics).
Prints one line per path and checks that both predict paths gave the same detections.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data.config import load_data_config, resolve_split  # noqa: E402
from trainer.evaluate import EvalOptions, evaluate  # noqa: E402
from trainer.export import ExportOptions, export, same_detections  # noqa: E402
from trainer.predict import Predictor  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def timed(predictor: Predictor, images: list[Path]) -> tuple[float, list]:
    predictor.predict(images[:4])  # warm-up: allocator, oneDNN / ORT kernels, decode grids
    started = time.perf_counter()
    dets = predictor.predict(images)
    return len(images) / (time.perf_counter() - started), dets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "datasets/coco128/coco128.yaml"))
    p.add_argument("--weights", default=str(SHARED / "weights/yolov5n.pt"))
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--images", type=int, default=0, help="first N val images (0: all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not Path(args.data).is_file() or not Path(args.weights).is_file():
        print(f"needs {args.data} and {args.weights} (the shared folder)", file=sys.stderr)
        return 2
    images = resolve_split(load_data_config(args.data).split("val"))
    images = images[:args.images] if args.images else images
    print(f"{len(images)} images at {args.imgsz}, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"CPU", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, _, parity = export(ExportOptions(weights=args.weights, out=f"{tmp}/model.onnx", imgsz=args.imgsz,
                                                    data=args.data))  # parity on the first 8 val images
        rates = {}
        for label, weights in (("torch (checkpoint, fused, channels_last)", args.weights),
                               (f"onnxruntime (CPU, {torch.get_num_threads()} threads)", onnx_path)):
            # ONNX Runtime gets torch's thread count: its default (physical cores) may differ on a VM.
            predictor = Predictor(weights, imgsz=args.imgsz, device="cpu", batch_size=args.batch_size,
                                  threads=torch.get_num_threads())
            rates[label] = timed(predictor, images)
            print(f"predict  {label:44s} {rates[label][0]:6.1f} img/s", flush=True)
        (_, a), (_, b) = rates.values()
        same = sum(same_detections(x, y) for x, y in zip(a, b))
        print(f"         same detections on {same}/{len(images)} images ({sum(map(len, a))} boxes); export check on "
              f"{parity.images} images: raw max |diff| {parity.max_abs_box:.1e} px, {parity.max_abs_score:.1e} score",
              flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its per-class table is not the point here
            record = evaluate(EvalOptions(data=args.data, weights=args.weights, imgsz=args.imgsz, device="cpu",
                                          plots=False, project=tmp, name="val", workers=2))
        print(f"evaluate {'loader + model + NMS + metrics, batch 32, rect':44s} "
              f"{record['images'] / record['seconds']:6.1f} img/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
