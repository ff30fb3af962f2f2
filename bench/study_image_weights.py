"""Study: does evaluation-driven image weighting help, at equal compute?

Runs the whole pipeline locally (kfp.local) twice per seed on the same synthetic dataset, once
with image weights and once without, with identical blocks, epochs, image size and world size,
then prints per-block mAP and the rare class's AP for both, and writes the figures as JSON.

    python bench/study_image_weights.py                          # seeds 0 and 1, the demo's sizes
    python bench/study_image_weights.py --seeds 0 --epochs-per-block 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evaluations(publish: Path) -> list[dict]:
    """Every block's metrics.json, in block order (earlier ones travel in the run folder)."""
    earlier = sorted((publish / "run" / "evaluations").glob("block*"), key=lambda p: int(p.name[5:]))
    records = [json.loads((p / "metrics.json").read_text()) for p in earlier]
    outputs = next((publish / "outputs").iterdir())
    finals = sorted(outputs.glob("evaluate*"), key=lambda p: int(p.name.split("-")[1]) if "-" in p.name else 1)
    records.append(json.loads((finals[-1] / "evaluation" / "metrics.json").read_text()))
    return records


def run(args: argparse.Namespace, data: Path, seed: int, weighted: bool) -> dict:
    tag = f"{'on' if weighted else 'off'}-seed{seed}"
    root = ROOT / "runs" / "study" / tag
    cmd = [sys.executable, "-m", "pipelines", "run-local", "--data", str(data), "--blocks", str(args.blocks),
           "--epochs-per-block", str(args.epochs_per_block), "--workers", str(args.workers), "--imgsz", str(args.imgsz),
           "--seed", str(seed), "--root", str(root)]
    cmd += [] if weighted else ["--no-image-weights"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    publish = max((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    per_block = evaluations(publish)
    rare = args.rare
    return {
        "tag": tag, "seed": seed, "image_weights": weighted,
        "map50": [r["map50"] for r in per_block], "map": [r["map"] for r in per_block],
        "rare_ap": [next(c["ap"] for c in r["per_class"] if c["class"] == rare) for r in per_block],
        "rare_ap50": [next(c["ap50"] for c in r["per_class"] if c["class"] == rare) for r in per_block],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--epochs-per-block", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--rare", default="hexagon")
    p.add_argument("--json", default=str(ROOT / "runs" / "study" / "image_weights_study.json"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipelines.__main__ import ensure_synthetic

    data = Path(ensure_synthetic(args.images, 0)).resolve()
    results = [run(args, data, seed, weighted) for seed in args.seeds for weighted in (True, False)]
    print(f"\n{'run':>12} {'mAP@.5 per block':>26} {'mAP@.5:.95 per block':>26} {args.rare + ' AP per block':>26}")
    fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    for r in results:
        print(f"{r['tag']:>12} {fmt(r['map50']):>26} {fmt(r['map']):>26} {fmt(r['rare_ap']):>26}")
    for weighted in (True, False):
        rows = [r for r in results if r["image_weights"] == weighted]
        mean = lambda key: sum(r[key][-1] for r in rows) / len(rows)  # noqa: E731
        print(f"image weights {'on ' if weighted else 'off'}: final mAP@.5 {mean('map50'):.3f}, mAP@.5:.95 {mean('map'):.3f}, "
              f"{args.rare} AP@.5:.95 {mean('rare_ap'):.3f}, AP@.5 {mean('rare_ap50'):.3f} (mean over {len(rows)} seeds)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
