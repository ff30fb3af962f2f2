"""Score kfyolo's evaluation of the official weights as YOLOv5 maps boxes back to the original image.

kfyolo maps a box back with the letterbox padding it applied (whole pixels) and each axis's own
resize ratio; YOLOv5 subtracts half the total padding (half a pixel off when the total is odd) and
uses the height ratio for both axes. This rescores bench/bench_vs_yolov5.py's kfyolo predictions
with YOLOv5's convention, which separates a detector difference from a bookkeeping one:

    python bench/bench_vs_yolov5.py --parts eval
    python bench/score_yolov5_mapping.py --sizes 320 480 640

bench_vs_yolov5.py now prints these rows itself; this rescores an earlier run's bench.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_vs_yolov5 import ROOT, letterbox_params, remap_yolov5_way, score


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
        remapped.write_text(json.dumps(remap_yolov5_way(json.loads((folder / "predictions.json").read_text()),
                                             letterbox_params(out / "coco128.yaml", size))))
        ours = score(folder / "gt.json", folder / "predictions.json")["ap"]
        theirs_way = score(folder / "gt.json", remapped)["ap"]
        ultra = results["eval"][str(size)]["ultralytics"][0]["ap"]
        print(f"{size}: ultralytics {ultra:.4f} | kfyolo {ours:.4f} ({ours - ultra:+.4f}) | kfyolo with YOLOv5's "
              f"mapping {theirs_way:.4f} ({theirs_way - ultra:+.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
