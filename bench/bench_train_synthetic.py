"""Bench: does yolov5n learn the synthetic shapes dataset, and how fast, on this machine?

Runs the real CLI (the issue's acceptance command) and prints the per-epoch mAP curve, the rare
class's AP, the wall time and training throughput:

    python bench/bench_train_synthetic.py                       # 30 epochs at 256 px, image weights, multi-scale
    python bench/bench_train_synthetic.py --amp off --epochs 5  # compare precisions
    python bench/bench_train_synthetic.py --json out.json       # also write the figures as JSON

The dataset (400 images, seed 0) is generated into data/synthetic-400-seed0-256px unless --data is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_dataset(data: str | None, images: int, seed: int, imgsz: int) -> Path:
    if data:
        return Path(data)
    out = ROOT / "data" / f"synthetic-{images}-seed{seed}-{imgsz}px"  # its own copy: make demo's may differ
    if not (out / "data.yaml").exists():
        subprocess.run([sys.executable, "-m", "trainer.data.synthetic", "--out", str(out), "--images", str(images),
                        "--seed", str(seed), "--imgsz", str(imgsz)], check=True, cwd=ROOT)
    return out / "data.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="data YAML (default: generate the synthetic dataset)")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--amp", default="auto")
    p.add_argument("--no-image-weights", action="store_true")
    p.add_argument("--no-multi-scale", action="store_true")
    p.add_argument("--project", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--name", default="synthetic")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()

    data = ensure_dataset(args.data, args.images, args.seed, args.imgsz)
    cmd = [sys.executable, "-m", "trainer.train", "--data", str(data), "--cfg", "yolov5n", "--imgsz", str(args.imgsz),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", "cpu", "--amp", args.amp,
           "--project", args.project, "--name", args.name, "--exist-ok", "--seed", str(args.seed)]
    cmd += [] if args.no_image_weights else ["--image-weights"]
    cmd += [] if args.no_multi_scale else ["--multi-scale"]
    run_dir = Path(args.project) / args.name
    if (run_dir / "results.csv").exists():  # --exist-ok reuses the folder: start the record afresh
        (run_dir / "results.csv").unlink()
    (run_dir / "image_weights.jsonl").unlink(missing_ok=True)
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"training failed with exit status {proc.returncode}", file=sys.stderr)
        return proc.returncode

    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    maps = json.loads((run_dir / "maps.json").read_text())
    report = json.loads((run_dir / "dataset_report.json").read_text())
    n_train = report["train"]["n_kept"]
    print(f"\n{'epoch':>5} {'mAP@.5':>8} {'mAP@.5:.95':>10} {'P':>6} {'R':>6} {'total loss':>10}")
    for r in rows:
        print(f"{r['epoch']:>5} {float(r['map50']):8.3f} {float(r['map']):10.3f} {float(r['precision']):6.3f} "
              f"{float(r['recall']):6.3f} {float(r['total']):10.4f}")
    per_class = ", ".join(f"{n} {m:.3f}" for n, m in zip(maps["names"], maps["maps"]))
    figures = {
        "epochs": len(rows), "wall_s": round(wall, 1), "train_images": n_train,
        "train_images_per_s": round(n_train * len(rows) / wall, 2),
        "final_map50": float(rows[-1]["map50"]), "final_map": float(rows[-1]["map"]),
        "best_map50": max(float(r["map50"]) for r in rows),
        "map50_curve": [round(float(r["map50"]), 4) for r in rows],
        "maps_last": dict(zip(maps["names"], maps["maps"])), "amp": args.amp, "imgsz": args.imgsz,
        "cpus": len(os.sched_getaffinity(0)),
    }
    print(f"\nper-class AP@.5:.95 (last epoch): {per_class}")
    print(f"wall time {wall:.0f} s for {len(rows)} epochs of {n_train} images "
          f"({figures['train_images_per_s']:.1f} train images/s including validation) on {figures['cpus']} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
