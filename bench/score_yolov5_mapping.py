"""Score kfyolo's evaluation of the official weights as YOLOv5 maps boxes back to the original image.

kfyolo maps a box back with the letterbox padding it applied (whole pixels) and each axis's own
resize ratio; YOLOv5 subtracts half the total padding (half a pixel off when the total is odd) and
uses the height ratio for both axes. This rescores bench/bench_vs_yolov5.py's kfyolo predictions
with YOLOv5's convention, which separates a detector difference from a bookkeeping one:

    python bench/bench_vs_yolov5.py --parts eval
    python bench/score_yolov5_mapping.py --sizes 320 480 640
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_vs_yolov5 import ROOT, score

from trainer.data.config import load_data_config
from trainer.data.dataset import YoloDataset


def letterbox_params(data: Path, imgsz: int) -> dict[int, tuple[float, ...]]:
    """Per image id: (rh, rw, applied padw, padh, YOLOv5's dw/2, dh/2), from the same rect batches."""
    ds = YoloDataset.from_config(load_data_config(data), "val", img_size=imgsz, batch_size=32, rect=True, stride=32,
                                 pad=0.5, workers=1)
    out = {}
    for i in range(ds.n):
        img, _, path, ((h0, w0), ((rh, rw), (padw, padh))) = ds[i]
        height, width = img.shape[1:]
        out[int(Path(path).stem)] = (rh, rw, padw, padh, (width - round(w0 * rw)) / 2, (height - round(h0 * rh)) / 2)
    return out


def remap(dets: list[dict], params: dict[int, tuple[float, ...]]) -> list[dict]:
    for d in dets:
        rh, rw, padw, padh, dw2, dh2 = params[d["image_id"]]
        x, y, w, h = d["bbox"]
        xs = [(v * rw + padw - dw2) / rh for v in (x, x + w)]  # back to the network input, then YOLOv5's way
        ys = [(v * rh + padh - dh2) / rh for v in (y, y + h)]
        d["bbox"] = [xs[0], ys[0], xs[1] - xs[0], ys[1] - ys[0]]
    return dets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 480, 640])
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_vs_yolov5"), help="bench_vs_yolov5.py's --out")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads((out / "bench.json").read_text())
    for size in args.sizes:
        folder = out / "kfyolo-val" / f"official-{size}-r0"
        remapped = out / f"kfyolo-predictions-{size}-yolov5-mapping.json"
        remapped.write_text(json.dumps(remap(json.loads((folder / "predictions.json").read_text()),
                                             letterbox_params(out / "coco128.yaml", size))))
        ours = score(folder / "gt.json", folder / "predictions.json")["ap"]
        theirs_way = score(folder / "gt.json", remapped)["ap"]
        ultra = results["eval"][str(size)]["ultralytics"][0]["ap"]
        print(f"{size}: ultralytics {ultra:.4f} | kfyolo {ours:.4f} ({ours - ultra:+.4f}) | kfyolo with YOLOv5's "
              f"mapping {theirs_way:.4f} ({theirs_way - ultra:+.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
