"""Bench: training images/s at world size 1 and 2 on this machine, with the same total threads.

World size 1 runs one process with T torch threads; world size 2 runs torchrun with two processes
of T/2 threads each (T = the CPUs available). Both load data in the training processes
(--workers 0) so no extra threads join in. Epoch 0 is a warm-up; the figure is the mean over the
remaining epochs of (training images / training seconds), from results.csv's train_s column.

    python bench/bench_ddp.py                 # synthetic data, 128 px, 4 epochs
    python bench/bench_ddp.py --imgsz 256 --epochs 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_train_synthetic import ensure_dataset  # noqa: E402


def run(world: int, data: Path, args: argparse.Namespace, threads: int) -> float:
    name = f"ddp_ws{world}"
    flags = ["-m", "trainer.train", "--data", str(data), "--cfg", "yolov5n", "--imgsz", str(args.imgsz),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", "cpu", "--workers", "0",
             "--noval", "--project", args.project, "--name", name, "--exist-ok", "--seed", "0"]
    per_rank = max(1, threads // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_rank), "PYTHONUNBUFFERED": "1"}
    run_dir = Path(args.project) / name
    (run_dir / "results.csv").unlink(missing_ok=True)
    if world == 1:
        cmd = [sys.executable, *flags]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(world), *flags]
    print(f"$ OMP_NUM_THREADS={per_rank} {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = list(csv.DictReader((run_dir / "results.csv").open()))[1:]  # epoch 0 warms up
    n = json.loads((run_dir / "dataset_report.json").read_text())["train"]["n_kept"]
    rates = [n / float(r["train_s"]) for r in rows]
    return sum(rates) / len(rates)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--project", default=str(ROOT / "runs" / "bench"))
    args = p.parse_args()
    data = ensure_dataset(args.data, 400, 0, 256)
    threads = len(os.sched_getaffinity(0))
    one = run(1, data, args, threads)
    two = run(2, data, args, threads)
    print(f"\nimgsz {args.imgsz}, batch {args.batch_size}, {threads} CPU threads in total")
    print(f"world size 1: {one:.1f} train images/s")
    print(f"world size 2: {two:.1f} train images/s")
    print(f"DDP overhead ratio (ws1 / ws2 throughput): {one / two:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
