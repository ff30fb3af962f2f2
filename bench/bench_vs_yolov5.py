"""Bench: kfyolo against unmodified ultralytics YOLOv5 v7.0, side by side on this machine's CPU.

The PyPI `yolov5` package (ultralytics YOLOv5 v7.0 as a library) is installed into its own
throw-away virtual environment (default runs/bench_vs_yolov5/venv, built with uv; never a kfyolo
dependency, none of its code copied). bench/yolov5_driver.py runs inside it and calls its public
entry points. Both codebases run on COCO128 at equal settings, alternating A B A B:

- eval: the official yolov5n.pt on the 128 held-out val2017 images at 320, 480 and 640
  (conf 0.001, IoU 0.6, batch 32, rect batches). Both write COCO detections and pycocotools scores
  both against one ground-truth file, so AP differences are the detectors', not the scorers'.
  The two map boxes back to the original image differently (YOLOv5 subtracts half the total
  letterbox padding, half a pixel off when the total is odd; kfyolo the padding it applied), so
  each AP row is followed by both detectors on one mapping: kfyolo's boxes mapped YOLOv5's way,
  and ultralytics' boxes mapped kfyolo's way.
- train: yolov5n fine-tuned from yolov5n.pt on COCO128 (hyp.scratch-low, --linear-lr,
  --noautoanchor, batch 16, workers 2), img/s over epochs 1.. (epoch 0 warms caches); then each
  run's last.pt is evaluated by its own codebase at the training size and scored as above.
- loader: the mosaic training loader alone, img/s over a few epochs.

    python bench/bench_vs_yolov5.py                         # everything (~15 min on 2 cores)
    python bench/bench_vs_yolov5.py --parts eval --sizes 320
    python bench/bench_vs_yolov5.py --parts train --amp bf16 --seeds 0 1

Time it alone: other CPU work on the machine skews every figure. Ultralytics loads its own .pt
files by unpickling them (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, inside the throw-away venv only);
kfyolo reads the same file without executing it. Writes bench.json and bench.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COCO128 = SHARED / "datasets" / "coco128"
VAL2017 = SHARED / "refs" / "coco128_val2017"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
# numpy<2.4: v7.0 calls np.trapz (gone in 2.4); setuptools<81: it imports pkg_resources (torch 2.13 needs >=77.0.3)
YOLOV5_PINS = ["yolov5==7.0.14", "torch==2.13.0", "torchvision==0.28.0", "numpy>=2.0.2,<2.4", "setuptools>=77.0.3,<81", "pycocotools"]
DRIVER = ROOT / "bench" / "yolov5_driver.py"


def find_uv() -> str:
    for candidate in (ROOT / ".tools" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    sys.exit("uv not found: run `make venv` first (it bootstraps uv into .tools/)")


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        uv = find_uv()
        print(f"building the throw-away ultralytics venv in {venv} ...", flush=True)
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        subprocess.run([uv, "pip", "install", "-q", "--python", str(python), *YOLOV5_PINS], check=True)
    return python


def link_split(src: Path, split: str, dst: Path) -> None:
    """dst/{images,labels}/split holding one symlink per file of src's. Ultralytics writes a label
    cache beside the labels folder it reads, and ../shared must stay untouched."""
    for kind in ("images", "labels"):
        folder = dst / kind / split
        folder.mkdir(parents=True, exist_ok=True)
        for f in sorted((src / kind / split).iterdir()):
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f.resolve())


def write_data_yaml(out: Path) -> Path:
    """One data YAML both codebases read: train COCO128, val the held-out val2017 images."""
    import yaml

    names = yaml.safe_load((COCO128 / "coco128.yaml").read_text())["names"]
    names = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
    data = out / "data"
    link_split(COCO128, "train2017", data / "coco128")
    link_split(VAL2017, "val2017", data / "val2017")
    path = out / "coco128.yaml"
    path.write_text(yaml.safe_dump({"path": str(data.resolve()), "train": "coco128/images/train2017",
                                    "val": "val2017/images/val2017", "names": names}))
    return path


def run_timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[str, dict]:
    """Run `cmd` with its output in `log`; returns stdout and the child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write_text(log.read_text() + proc.stdout)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n  see {log}")
    return proc.stdout, {"wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
                         "sys_s": after.ru_stime - before.ru_stime}


def driver_result(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError("the yolov5 driver printed no RESULT line")


def ultralytics_env(out: Path) -> dict:
    """No network here: ultralytics fetches Arial.ttf into its config folder unless one is there, so
    give it a config folder of its own holding matplotlib's DejaVu Sans under that name."""
    import matplotlib

    config = out / "yolov5-config"
    config.mkdir(exist_ok=True)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (config / name).exists():
            shutil.copyfile(font, config / name)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", YOLOV5_CONFIG_DIR=str(config))
    env.pop("PYTHONPATH", None)
    return env


def letterbox_params(data: Path, imgsz: int) -> dict[int, tuple[float, ...]]:
    """Per val image id: (rh, rw, applied padw, padh, YOLOv5's dw/2, dh/2), from the rect batches
    (batch 32, pad 0.5) that kfyolo's evaluation letterboxes into."""
    from trainer.data.config import load_data_config
    from trainer.data.dataset import YoloDataset

    ds = YoloDataset.from_config(load_data_config(data), "val", img_size=imgsz, batch_size=32, rect=True, stride=32,
                                 pad=0.5, workers=1)
    out = {}
    for i in range(ds.n):
        img, _, path, ((h0, w0), ((rh, rw), (padw, padh))) = ds[i]
        height, width = img.shape[1:]
        out[int(Path(path).stem)] = (rh, rw, padw, padh, (width - round(w0 * rw)) / 2, (height - round(h0 * rh)) / 2)
    return out


def remap_yolov5_way(dets: list[dict], params: dict[int, tuple[float, ...]]) -> list[dict]:
    """kfyolo's COCO detections mapped back to the original image as YOLOv5 maps them: kfyolo
    subtracts the whole pixels of padding it applied and divides by each axis's own ratio; YOLOv5
    subtracts half the total padding (half a pixel off when the total is odd) and divides both axes
    by the height ratio. Scoring both ways separates a detector difference from this bookkeeping."""
    out = []
    for d in dets:
        rh, rw, padw, padh, dw2, dh2 = params[d["image_id"]]
        x, y, w, h = d["bbox"]
        xs = [(v * rw + padw - dw2) / rh for v in (x, x + w)]  # back to the network input, then YOLOv5's way
        ys = [(v * rh + padh - dh2) / rh for v in (y, y + h)]
        out.append({**d, "bbox": [xs[0], ys[0], xs[1] - xs[0], ys[1] - ys[0]]})
    return out


def remap_exact_way(dets: list[dict], params: dict[int, tuple[float, ...]]) -> list[dict]:
    """ultralytics' COCO detections mapped back the exact way, kfyolo's: the inverse of
    remap_yolov5_way. Scoring ultralytics' boxes this way puts both detectors on kfyolo's mapping,
    as remap_yolov5_way puts both on YOLOv5's."""
    out = []
    for d in dets:
        rh, rw, padw, padh, dw2, dh2 = params[d["image_id"]]
        x, y, w, h = d["bbox"]
        xs = [(v * rh + dw2 - padw) / rw for v in (x, x + w)]  # back to the network input as YOLOv5 left it
        ys = [(v * rh + dh2 - padh) / rh for v in (y, y + h)]
        out.append({**d, "bbox": [xs[0], ys[0], xs[1] - xs[0], ys[1] - ys[0]]})
    return out


def score(gt: Path, predictions: Path) -> dict:
    """pycocotools AP and AP50 of a COCO results file against the shared ground truth."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt))
        dets = json.loads(predictions.read_text())
        coco_dt = coco_gt.loadRes(dets) if dets else None
        if coco_dt is None:
            return {"ap": 0.0, "ap50": 0.0}
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted(coco_gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"ap": float(ev.stats[0]), "ap50": float(ev.stats[1])}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.yv5 = ensure_venv(Path(args.venv))
        self.data = write_data_yaml(self.out)
        self.gt: Path | None = None
        self.letterbox: dict[int, dict[int, tuple[float, ...]]] = {}
        self.results: dict = {"settings": {k: v for k, v in vars(args).items()}, "eval": {}, "train": {}, "loader": {}}
        previous = self.out / "bench.json"
        if previous.exists():  # keep the parts not run this time
            old = json.loads(previous.read_text())
            for part in ("eval", "train", "loader"):
                if part not in args.parts:
                    self.results[part] = old.get(part, {})

    # -- kfyolo side
    def kfyolo_eval(self, weights: Path, imgsz: int, name: str) -> dict:
        folder = self.out / "kfyolo-val" / name
        cmd = [sys.executable, "-m", "trainer.evaluate", "--data", str(self.data), "--weights", str(weights),
               "--imgsz", str(imgsz), "--batch-size", "32", "--device", "cpu", "--save-json", "--no-plots",
               "--workers", str(self.args.workers), "--project", str(folder.parent), "--name", folder.name,
               "--exist-ok", "--amp", self.args.amp]
        stdout, cpu = run_timed(cmd, self.out / f"kfyolo-val-{name}.log")
        metrics = json.loads((folder / "metrics.json").read_text())
        if self.gt is None:
            self.gt = folder / "gt.json"
        # kfyolo goes first in every A B pair, so its ground truth is the one both are scored against
        predictions = folder / "predictions.json"
        return {**cpu, "loop_s": metrics["seconds"], **score(self.gt, predictions),
                "ap_yolov5_mapping": self.rescore(predictions, remap_yolov5_way, imgsz, "yolov5")}

    def rescore(self, predictions: Path, remap, imgsz: int, mapping: str) -> float:
        """AP of `predictions` mapped back to the original images by `remap` (saved beside them)."""
        if imgsz not in self.letterbox:
            self.letterbox[imgsz] = letterbox_params(self.data, imgsz)
        remapped = predictions.with_name(f"predictions-{mapping}-mapping.json")
        remapped.write_text(json.dumps(remap(json.loads(predictions.read_text()), self.letterbox[imgsz])))
        return score(self.gt, remapped)["ap"]

    def kfyolo_train(self, seed: int, name: str) -> dict:
        shutil.rmtree(self.out / "kfyolo-train" / name, ignore_errors=True)  # results.csv appends
        cmd = [sys.executable, "-m", "trainer.train", "--data", str(self.data), "--weights", str(WEIGHTS),
               "--imgsz", str(self.args.train_imgsz), "--epochs", str(self.args.epochs), "--batch-size", "16",
               "--workers", str(self.args.workers), "--seed", str(seed), "--device", "cpu", "--noval", "--linear-lr",
               "--amp", self.args.amp, "--cache", self.args.cache, "--project", str(self.out / "kfyolo-train"),
               "--name", name, "--exist-ok"]
        log_file = self.out / f"kfyolo-train-{name}.log"
        _, cpu = run_timed(cmd, log_file)
        filled = re.search(r"cached in ([0-9.]+) s", log_file.read_text())
        import csv

        rows = list(csv.DictReader((self.out / "kfyolo-train" / name / "results.csv").open()))
        epoch_s = [float(r["train_s"]) for r in rows]
        last = self.out / "kfyolo-train" / name / "weights" / "last.pt"
        return {**self.kfyolo_eval(last, self.args.train_imgsz, f"train-{name}"), **cpu, "epoch_s": epoch_s,
                "cache_s": float(filled.group(1)) if filled else None}

    def kfyolo_loader(self) -> dict:
        code = (
            "import json,sys,time\n"
            "from trainer.config import TrainOptions, load_hyp\n"
            "from trainer.data.config import load_data_config\n"
            "from trainer import distributed\n"
            "from trainer.fit import make_loaders\n"
            "import torch\n"
            f"opt = TrainOptions(data={str(self.data)!r}, imgsz={self.args.loader_imgsz}, batch_size=16, "
            f"workers={self.args.workers}, cache={self.args.cache!r})\n"
            "ctx = distributed.env_context()\n"
            "_, loader, _ = make_loaders(opt, load_hyp(opt.hyp), load_data_config(opt.data), 32, ctx, "
            "torch.device('cpu'))\n"
            "n, t0 = 0, None\n"
            f"for e in range({self.args.loader_epochs}):\n"
            "    loader.sampler.set_epoch(e)\n"
            "    for imgs, *_ in loader:\n"
            "        if t0 is None:\n"
            "            t0 = time.perf_counter(); continue\n"
            "        n += imgs.shape[0]\n"
            "print('RESULT ' + json.dumps({'images': n, 'seconds': time.perf_counter() - t0}))\n")
        stdout, cpu = run_timed([sys.executable, "-c", code], self.out / "kfyolo-loader.log")
        return {**cpu, **driver_result(stdout)}

    # -- ultralytics side
    def yolov5(self, mode: str, name: str, *extra: str) -> tuple[dict, dict]:
        cmd = [str(self.yv5), str(DRIVER), mode, "--data", str(self.data), "--workers", str(self.args.workers),
               "--cache", self.args.yolov5_cache,
               *extra]
        stdout, cpu = run_timed(cmd, self.out / f"yolov5-{mode}-{name}.log", env=ultralytics_env(self.out))
        return driver_result(stdout), cpu

    def yolov5_eval(self, weights: Path, imgsz: int, name: str) -> dict:
        folder = self.out / "yolov5-val" / name
        res, cpu = self.yolov5("val", name, "--weights", str(weights), "--imgsz", str(imgsz), "--batch-size", "32",
                               "--out", str(folder))
        predictions = Path(res["predictions"])
        return {**cpu, "loop_s": res["seconds"], **score(self.gt, predictions),
                "ap_exact_mapping": self.rescore(predictions, remap_exact_way, imgsz, "exact")}

    def yolov5_train(self, seed: int, name: str) -> dict:
        folder = self.out / "yolov5-train" / name
        res, cpu = self.yolov5("train", name, "--weights", str(WEIGHTS), "--imgsz", str(self.args.train_imgsz),
                               "--epochs", str(self.args.epochs), "--batch-size", "16", "--seed", str(seed),
                               "--out", str(folder))
        return {**self.yolov5_eval(Path(res["last"]), self.args.train_imgsz, f"train-{name}"), **cpu,
                "epoch_s": res["epoch_s"]}

    def yolov5_loader(self) -> dict:
        # its own hyp.scratch-low.yaml, the same augmentation as kfyolo's hyp.scratch
        res, cpu = self.yolov5("loader", "bench", "--imgsz", str(self.args.loader_imgsz), "--batch-size", "16",
                               "--epochs", str(self.args.loader_epochs))
        return {**cpu, **res}

    # -- parts, each alternating A B A B
    def part_eval(self) -> None:
        for size in self.args.sizes:
            runs = {"kfyolo": [], "ultralytics": []}
            for r in range(self.args.repeats):
                runs["kfyolo"].append(self.kfyolo_eval(WEIGHTS, size, f"official-{size}-r{r}"))
                runs["ultralytics"].append(self.yolov5_eval(WEIGHTS, size, f"official-{size}-r{r}"))
                print(f"eval {size}: kfyolo {runs['kfyolo'][-1]} | ultralytics {runs['ultralytics'][-1]}", flush=True)
            self.results["eval"][str(size)] = runs
            self.save()

    def part_train(self) -> None:
        runs = {"kfyolo": [], "ultralytics": []}
        for seed in self.args.seeds:
            runs["kfyolo"].append(self.kfyolo_train(seed, f"s{seed}"))
            runs["ultralytics"].append(self.yolov5_train(seed, f"s{seed}"))
            print(f"train seed {seed}: kfyolo {runs['kfyolo'][-1]} | ultralytics {runs['ultralytics'][-1]}", flush=True)
            self.results["train"] = {**runs, "settings": self.part_settings()}
            self.save()

    def part_loader(self) -> None:
        runs = {"kfyolo": [], "ultralytics": []}
        for _ in range(self.args.repeats):
            runs["kfyolo"].append(self.kfyolo_loader())
            runs["ultralytics"].append(self.yolov5_loader())
        self.results["loader"] = {**runs, "settings": self.part_settings()}
        self.save()

    def part_settings(self) -> dict:
        return {k: getattr(self.args, k) for k in ("amp", "cache", "yolov5_cache", "workers", "epochs")}

    def save(self) -> None:
        (self.out / "bench.json").write_text(json.dumps(self.results, indent=1))
        table = markdown(self.results)
        (self.out / "bench.md").write_text(table)


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def markdown(results: dict) -> str:
    s = results["settings"]
    rows = ["| | ultralytics v7.0 | kfyolo | kfyolo / ultralytics |", "|---|---|---|---|"]

    def add(label: str, u: float, k: float, diff: bool = False, fmt: str = "{:.1f}") -> None:
        rel = f"{k - u:+.4f}" if diff else f"{k / u:.2f}"
        rows.append(f"| {label} | {fmt.format(u)} | {fmt.format(k)} | {rel} |")

    train = results.get("train") or {}
    if train.get("kfyolo") and train.get("ultralytics"):
        def ips(runs: list[dict]) -> float:  # epoch 0 warms caches and starts the workers: left out
            return _mean([128 * len(r["epoch_s"][1:]) / sum(r["epoch_s"][1:]) for r in runs])

        ts = {**s, **train.get("settings", {})}
        caches = f"kfyolo --cache {ts.get('cache', 'off')}, ultralytics {'--cache ' + ts['yolov5_cache'] if ts.get('yolov5_cache') else 'no cache'}"
        add(f"train img/s at {s['train_imgsz']}, epochs 1-{ts['epochs'] - 1} ({ts['amp']}; {caches})",
            ips(train["ultralytics"]), ips(train["kfyolo"]))
        fills = [r["cache_s"] for r in train["kfyolo"] if r.get("cache_s") is not None]
        if fills:
            rows.append(f"| kfyolo's image cache, filled before epoch 0 | | {_mean(fills):.1f} s | |")
        add(f"{s['epochs']}-epoch fine-tune AP at {s['train_imgsz']} (mean of {len(train['kfyolo'])} seeds)",
            _mean([r["ap"] for r in train["ultralytics"]]), _mean([r["ap"] for r in train["kfyolo"]]), True, "{:.4f}")
        if all("ap_yolov5_mapping" in r for r in train["kfyolo"]):
            add("the same, kfyolo's boxes mapped back YOLOv5's way", _mean([r["ap"] for r in train["ultralytics"]]),
                _mean([r["ap_yolov5_mapping"] for r in train["kfyolo"]]), True, "{:.4f}")
        if all("ap_exact_mapping" in r for r in train["ultralytics"]):
            add("the same, ultralytics' boxes mapped back kfyolo's (exact) way",
                _mean([r["ap_exact_mapping"] for r in train["ultralytics"]]), _mean([r["ap"] for r in train["kfyolo"]]),
                True, "{:.4f}")
    for size, runs in (results.get("eval") or {}).items():
        if runs["kfyolo"] and runs["ultralytics"]:
            add(f"val img/s at {size} (loop and metrics, 128 images)",
                _mean([128 / r["loop_s"] for r in runs["ultralytics"]]), _mean([128 / r["loop_s"] for r in runs["kfyolo"]]))
            add(f"official yolov5n AP at {size}, pycocotools", runs["ultralytics"][0]["ap"], runs["kfyolo"][0]["ap"],
                True, "{:.4f}")
            if "ap_yolov5_mapping" in runs["kfyolo"][0]:
                add("the same, kfyolo's boxes mapped back YOLOv5's way", runs["ultralytics"][0]["ap"],
                    runs["kfyolo"][0]["ap_yolov5_mapping"], True, "{:.4f}")
            if "ap_exact_mapping" in runs["ultralytics"][0]:
                add("the same, ultralytics' boxes mapped back kfyolo's (exact) way", runs["ultralytics"][0]["ap_exact_mapping"],
                    runs["kfyolo"][0]["ap"], True, "{:.4f}")
    loader = results.get("loader") or {}
    if loader.get("kfyolo") and loader.get("ultralytics"):
        ls = {**s, **loader.get("settings", {})}
        caches = f"kfyolo --cache {ls.get('cache', 'off')}, ultralytics {'--cache ' + ls['yolov5_cache'] if ls.get('yolov5_cache') else 'no cache'}"
        add(f"mosaic loader img/s at {s['loader_imgsz']}, workers {ls['workers']} ({caches})",
            _mean([r["images"] / r["seconds"] for r in loader["ultralytics"]]),
            _mean([r["images"] / r["seconds"] for r in loader["kfyolo"]]))
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["eval", "train", "loader"], choices=["eval", "train", "loader"])
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 480, 640])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-imgsz", type=int, default=320)
    p.add_argument("--loader-imgsz", type=int, default=640)
    p.add_argument("--loader-epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="A B rounds per eval size and for the loader")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", default="off", help="kfyolo's --amp (ultralytics trains fp32 on CPU)")
    p.add_argument("--cache", default="auto", choices=["auto", "ram", "off"],
                   help="kfyolo's --cache (default auto, kfyolo's default: decoded images in RAM when they fit)")
    p.add_argument("--yolov5-cache", default="", choices=["", "ram"],
                   help="ultralytics' --cache for train and loader (default: none, its default)")
    p.add_argument("--venv", default=str(ROOT / "runs" / "bench_vs_yolov5" / "venv"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_vs_yolov5"))
    args = p.parse_args()
    for path in (COCO128, VAL2017, WEIGHTS):
        if not path.exists():
            sys.exit(f"{path} is missing: this bench needs ../shared")
    bench = Bench(args)
    for part in ("eval", "train", "loader"):
        if part in args.parts:
            getattr(bench, f"part_{part}")()
    print(markdown(bench.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
