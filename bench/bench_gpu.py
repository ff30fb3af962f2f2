"""Bench: the GPU figures, in one short run. It needs a CUDA machine, and none has been lent to this
project so far, so this script is prepared and dry-run on CPU only.

It runs kfyolo's own CLIs, as a user would, on COCO128 from the official yolov5n weights and prints
one table, naming the GPU:
- training img/s with CUDA AMP (fp16 + GradScaler) and channels_last, eager and `--compile`
  (inductor). Epoch 0 is left out: it warms the loader and, compiled, compiles;
- the same under DDP with NCCL over every GPU there (torchrun, one rank per GPU), when there are 2
  or more. NCCL cannot put two ranks on one GPU;
- validation loop img/s (trainer.evaluate, fp16, Conv+BN fused).

    python bench/bench_gpu.py                       # about 5 minutes on one modern GPU
    python bench/bench_gpu.py --dry-run-cpu         # the same steps, tiny, on CPU (gloo, aot_eager)

Writes bench_gpu.json and bench_gpu.md into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from bench_vs_yolov5 import run_timed  # bench/ is the script's folder, on sys.path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "datasets" / "coco128" / "coco128.yaml"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"


def train_ips(folder: Path, images: int) -> float:
    """img/s over epochs 1.. of a run's results.csv (epoch 0 warms up)."""
    rows = list(csv.DictReader((folder / "results.csv").open()))
    seconds = [float(r["train_s"]) for r in rows[1:]]
    return images * len(seconds) / sum(seconds)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        cpu = args.dry_run_cpu
        self.device = "cpu" if cpu else "0"
        self.amp = "off" if cpu else "fp16"
        self.backend = "aot_eager" if cpu else "inductor"
        self.imgsz = 64 if cpu else args.imgsz
        self.batch = 8 if cpu else args.batch_size
        self.epochs = 2 if cpu else args.epochs
        self.images = len(list((DATA.parent / "images" / "train2017").glob("*.jpg")))

    def train(self, name: str, *extra: str, ranks: int = 1) -> dict:
        folder = self.out / "train" / name
        cmd = ["-m", "trainer.train", "--data", str(DATA), "--weights", str(WEIGHTS), "--imgsz", str(self.imgsz),
               "--batch-size", str(self.batch * ranks), "--epochs", str(self.epochs), "--noval", "--cache", "ram",
               "--amp", self.amp, "--memory-format", "channels_last", "--workers", str(self.args.workers),
               "--project", str(folder.parent), "--name", name, "--exist-ok", *extra]
        if ranks > 1:
            cmd = ["-m", "trainer.torchrun", "--standalone", "--nproc_per_node", str(ranks), *cmd]
            cmd += ["--device", "cpu" if self.args.dry_run_cpu else ""]  # each rank takes its local GPU
        else:
            cmd += ["--device", self.device]
        (folder / "results.csv").unlink(missing_ok=True)  # results.csv appends
        _, cpu = run_timed([sys.executable, *cmd], self.out / f"train-{name}.log")
        return {"img_s": train_ips(folder, self.images), "wall_s": cpu["wall_s"], "ranks": ranks}

    def val(self) -> dict:
        folder = self.out / "val"
        cmd = [sys.executable, "-m", "trainer.evaluate", "--data", str(DATA), "--weights", str(WEIGHTS),
               "--imgsz", str(self.imgsz), "--batch-size", str(self.args.val_batch_size), "--device", self.device,
               "--amp", self.amp, "--no-plots", "--workers", str(self.args.workers), "--project", str(folder.parent),
               "--name", folder.name, "--exist-ok"]
        run_timed(cmd, self.out / "val.log")
        metrics = json.loads((folder / "metrics.json").read_text())
        return {"img_s": self.images / metrics["seconds"], "map50": metrics["map50"], "map": metrics["map"]}


def describe() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpus else None}


def markdown(r: dict) -> str:
    gpus = r["machine"]["gpus"]
    where = f"{len(gpus)} x {gpus[0]}" if gpus else "CPU (dry run: tiny sizes, fp32, aot_eager; not GPU figures)"
    s = dict(r["settings"])
    s["amp"] = {"off": "fp32"}.get(s["amp"], s["amp"])
    rows = [f"{where}; torch {r['machine']['torch']}, CUDA {r['machine']['cuda']}; yolov5n, COCO128, "
            f"{s['imgsz']} px, batch {s['batch']} per GPU, epochs 1-{s['epochs'] - 1}", "",
            "| | img/s |", "|---|---|"]
    t = r["train"]
    rows.append(f"| train, {s['amp']} + channels_last, eager | {t['eager']['img_s']:.1f} |")
    rows.append(f"| train, {s['amp']} + channels_last, --compile {s['backend']} | {t['compiled']['img_s']:.1f} |")
    if "ddp" in t:
        rows.append(f"| train, DDP over {t['ddp']['ranks']} ranks ({s['dist_backend']}), total | {t['ddp']['img_s']:.1f} |")
    else:
        rows.append(f"| train, DDP | not run: {r['ddp_skipped']} |")
    v = r["val"]
    rows.append(f"| val loop, {s['amp']}, batch {s['val_batch']} (mAP@.5 {v['map50']:.3f}) | {v['img_s']:.1f} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=64, help="per GPU")
    p.add_argument("--val-batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--dry-run-cpu", action="store_true", help="run every step tiny on CPU, to check the script")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_gpu"))
    args = p.parse_args()
    for path in (DATA, WEIGHTS):
        if not path.exists():
            sys.exit(f"{path} is missing: this bench needs ../shared")
    machine = describe()
    if not machine["gpus"] and not args.dry_run_cpu:
        sys.exit("no CUDA device here: this bench reports GPU figures (--dry-run-cpu checks it on CPU)")
    bench = Bench(args)
    results = {"machine": machine, "settings": {"imgsz": bench.imgsz, "batch": bench.batch, "epochs": bench.epochs,
                                                "amp": bench.amp, "backend": bench.backend,
                                                "val_batch": args.val_batch_size,
                                                "dist_backend": "gloo" if args.dry_run_cpu else "nccl"}}
    results["train"] = {"eager": bench.train("eager"), "compiled": bench.train("compiled", "--compile", bench.backend)}
    ranks = 2 if args.dry_run_cpu else len(machine["gpus"])
    if ranks >= 2:
        results["train"]["ddp"] = bench.train("ddp", ranks=ranks)
    else:
        results["ddp_skipped"] = f"{ranks} GPU here; NCCL needs one GPU per rank"
    results["val"] = bench.val()
    (bench.out / "bench_gpu.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (bench.out / "bench_gpu.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
