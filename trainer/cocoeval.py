"""Evaluate COCO detection results against COCO ground truth (bbox), as pycocotools does.

    python -m trainer.cocoeval instances_val.json detections.json
    python -m trainer.cocoeval instances_val.json detections.json --json

The first form prints COCOeval's 12-line summary, the second one JSON object with keys
AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl (-1 where undefined).
Unreadable or malformed input prints the offending entry and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Sequence

import numpy as np

from trainer.metrics.coco import CocoFormatError, evaluate_coco
from trainer.metrics.coco_json import load_coco_dt, load_coco_gt

# (title, kind, IoU label, area label, maxDets) per stat, in COCOeval.summarize's order
_LINES = (
    ("Average Precision", "(AP)", "0.50:0.95", "all", 100),
    ("Average Precision", "(AP)", "0.50", "all", 100),
    ("Average Precision", "(AP)", "0.75", "all", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "small", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "medium", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "large", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 1),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 10),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "small", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "medium", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "large", 100),
)


def format_summary(stats: Sequence[float] | np.ndarray) -> str:
    """The 12 stats in COCOeval.summarize's printed layout, one line each."""
    return "\n".join(
        f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={md:>3d} ] = {v:0.3f}"
        for (title, kind, iou, area, md), v in zip(_LINES, stats)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.cocoeval", description="COCO bbox evaluation (pycocotools-exact)."
    )
    parser.add_argument("gt", help="COCO ground-truth JSON (images, annotations, categories)")
    parser.add_argument("dt", help="COCO detection results JSON (list of detections)")
    parser.add_argument("--json", action="store_true", help="print the 12 stats as one JSON object")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gt = load_coco_gt(args.gt)
            dt = load_coco_dt(args.dt, gt)
        except CocoFormatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    result = evaluate_coco(gt, dt)
    print(json.dumps(result.as_dict()) if args.json else format_summary(result.stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
