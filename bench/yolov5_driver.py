"""Runs unmodified ultralytics YOLOv5 (the PyPI `yolov5` package) for bench/bench_vs_yolov5.py.

This file runs only inside the bench's throw-away virtual environment, never in kfyolo's: it
imports `yolov5` and calls its public entry points (`train.main` with a `Callbacks` object for
timing, `val.run`, `utils.dataloaders.create_dataloader`). It prints one JSON line on stdout,
prefixed with `RESULT `, that the bench parses.

    python yolov5_driver.py train  --data D --weights W --imgsz 320 --epochs 3 --batch-size 16 --seed 0 --out DIR
    python yolov5_driver.py val    --data D --weights W --imgsz 640 --batch-size 32 --out DIR
    python yolov5_driver.py loader --data D --imgsz 640 --batch-size 16 --workers 2 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _train(a: argparse.Namespace) -> dict:
    from yolov5 import train as yt
    from yolov5.utils.callbacks import Callbacks

    epoch_s: list[float] = []
    started: list[float] = []
    callbacks = Callbacks()
    callbacks.register_action("on_train_epoch_start", callback=lambda *args, **kw: started.append(time.perf_counter()))
    callbacks.register_action("on_train_epoch_end",
                              callback=lambda *args, **kw: epoch_s.append(time.perf_counter() - started[-1]))
    # noval stays off: the packaged v7.0.14 fails with --noval (`map50s` unbound after epoch 0).
    # Validation runs after on_train_epoch_end, so the epoch times below do not include it.
    opt = yt.parse_opt(True)
    for key, value in dict(data=a.data, weights=a.weights, cfg=a.cfg, imgsz=a.imgsz, epochs=a.epochs,
                           batch_size=a.batch_size, workers=a.workers, seed=a.seed, device="cpu", noval=False,
                           noplots=True, noautoanchor=True, linear_lr=True, project=str(Path(a.out).parent),
                           name=Path(a.out).name, exist_ok=True, cache=a.cache or None).items():
        setattr(opt, key, value)
    yt.main(opt, callbacks=callbacks)
    return {"epoch_s": epoch_s, "last": str(Path(a.out) / "weights" / "last.pt")}


def _val(a: argparse.Namespace) -> dict:
    from yolov5 import val as yv
    from yolov5.utils.callbacks import Callbacks

    marks: dict[str, float] = {}
    # From the loop's start to its last batch (on_val_end fires only with plots). kfyolo's figure also
    # counts its metrics, so this comparison leans towards ultralytics.
    callbacks = Callbacks()
    callbacks.register_action("on_val_start", callback=lambda *args, **kw: marks.setdefault("start", time.perf_counter()))
    callbacks.register_action("on_val_batch_end", callback=lambda *args, **kw: marks.__setitem__("end", time.perf_counter()))
    yv.run(data=a.data, weights=a.weights, batch_size=a.batch_size, imgsz=a.imgsz, device="cpu", workers=a.workers,
           save_json=True, plots=False, project=str(Path(a.out).parent), name=Path(a.out).name, exist_ok=True,
           callbacks=callbacks)
    seconds = marks["end"] - marks["start"]
    preds = sorted(Path(a.out).glob("*_predictions.json"))
    return {"seconds": seconds, "predictions": str(preds[-1]) if preds else None}


def _loader(a: argparse.Namespace) -> dict:
    import yaml
    from yolov5.utils.dataloaders import create_dataloader

    import yolov5

    hyp_file = Path(a.hyp) if a.hyp else Path(yolov5.__file__).parent / "data" / "hyps" / "hyp.scratch-low.yaml"
    hyp = yaml.safe_load(hyp_file.read_text())
    data = yaml.safe_load(Path(a.data).read_text())
    train = str(Path(data["path"]) / data["train"])
    loader, _ = create_dataloader(train, a.imgsz, a.batch_size, 32, hyp=hyp, augment=True, workers=a.workers,
                                  shuffle=True, seed=0, cache=a.cache or False)
    images, t0 = 0, None
    for _ in range(a.epochs):
        for imgs, *_ in loader:
            if t0 is None:  # the clock starts after the first batch: worker start-up is not counted
                t0 = time.perf_counter()
                continue
            images += imgs.shape[0]
    return {"images": images, "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "val", "loader"])
    p.add_argument("--data", required=True)
    p.add_argument("--weights", default="")
    p.add_argument("--cfg", default="")
    p.add_argument("--hyp", default="")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/yolov5")
    p.add_argument("--cache", default="", choices=["", "ram"], help="ultralytics' --cache (default: none)")
    a = p.parse_args()
    result = {"train": _train, "val": _val, "loader": _loader}[a.mode](a)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
