"""Compile the feedback pipeline, or run it here with kfp.local.

    python -m pipelines compile --out pipeline.yaml [--blocks 3] [--image REGISTRY/kfyolo:TAG]
    python -m pipelines compile --launcher pytorchjob --image REGISTRY/kfyolo:TAG --workers 2 \\
        --gpus-per-worker 1 [--s3-secret kfyolo-s3] [--s3-prefix s3://kfyolo/pipelines] [--elastic 1:4]
    python -m pipelines compile --launcher trainjob --image REGISTRY/kfyolo:TAG --workers 2 \\
        --gpus-per-worker 1 [--runtime torch-distributed]            # Kubeflow Trainer v2
    python -m pipelines run-local                       # synthetic dataset, 3 blocks, 2 workers, CPU
    python -m pipelines run-local --data ../shared/datasets/coco128/coco128.yaml \\
        --weights ../shared/weights/yolov5n.pt --imgsz 320 --blocks 2 --epochs-per-block 2

run-local prints one line per step and the per-block mAP; the full KFP log goes to a file next to
the outputs (runs/pipelines/<timestamp>/).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TextIO

from components import warm

if TYPE_CHECKING:
    from pipelines.kfyolo_pipeline import ClusterOptions

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SYNTHETIC = Path("data/synthetic")


class StepPrinter:
    """A stdout stand-in: everything goes to the log file; step starts/ends and [kfyolo] lines
    also go to the console, so a local run reads as one line per step."""

    def __init__(self, console: TextIO, log: TextIO, verbose: bool = False):
        self.console, self.log, self.verbose = console, log, verbose
        self.buffer = ""
        self.started: dict[str, float] = {}
        self.durations: dict[str, float] = {}  # step name -> seconds, as the steps end

    def write(self, text: str) -> int:
        self.log.write(ANSI.sub("", text))  # the log is read in editors and CI pages, not terminals
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        plain = ANSI.sub("", line).strip()
        if self.verbose:
            self.console.write(line + "\n")
            return
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        if m := re.search(r"Executing task '([^']+)'", plain):
            self.started[m.group(1)] = time.monotonic()
            self.console.write(f"{stamp}  ... {m.group(1)}\n")
        elif m := re.search(r"Task '([^']+)' finished with status (\w+)", plain):
            took = time.monotonic() - self.started.get(m.group(1), time.monotonic())
            self.durations[m.group(1)] = took
            self.console.write(f"{stamp}  {'ok ' if m.group(2) == 'SUCCESS' else 'FAILED'} {m.group(1)} ({took:.0f} s)\n")
        elif "[kfyolo]" in plain:
            self.console.write(f"{stamp}      {plain[plain.index('[kfyolo]') + 9:]}\n")
        elif re.search(r"Pipeline '[^']+' finished with status", plain) or plain.startswith("error:") \
                or re.match(r"[\w.]*(Error|Exception): ", plain):  # the last line of a step's traceback
            self.console.write(f"{stamp}  {plain}\n")
        self.console.flush()

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return False


def compile_pipeline(out: Path, blocks: int, image: str, launcher: str, cluster: ClusterOptions | None = None,
                     workers: int = 2) -> Path:
    from kfp import compiler

    from pipelines.kfyolo_pipeline import build_pipeline

    compiler.Compiler().compile(build_pipeline(blocks, image, launcher, cluster, workers), str(out))
    return out


def elastic_range(text: str) -> tuple[int, int]:
    """'1:4' -> (1, 4); '' -> (0, 0), not elastic."""
    if not text:
        return 0, 0
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--elastic {text!r} must look like MIN:MAX (pods), e.g. 1:4")
    return int(low), int(high)


def cluster_options(args: argparse.Namespace) -> ClusterOptions | None:
    """The cluster launchers' settings; KFP's own Secret stages under its own bucket by default."""
    from pipelines.kfyolo_pipeline import CLUSTER_LAUNCHERS, ClusterOptions

    if args.launcher not in CLUSTER_LAUNCHERS:
        return None
    if args.elastic and args.launcher != "pytorchjob":
        raise ValueError("--elastic needs --launcher pytorchjob: Kubeflow Trainer v2 has no elastic mode yet")
    elastic_min, elastic_max = elastic_range(args.elastic)
    prefix = args.s3_prefix or ("s3://mlpipeline/kfyolo" if args.s3_secret == "mlpipeline-minio-artifact"
                                else ClusterOptions.s3_prefix)
    return ClusterOptions(gpus_per_worker=args.gpus_per_worker, nproc_per_node=args.nproc_per_node, cpu=args.cpu,
                          memory=args.memory, shm_size=args.shm_size, s3_secret=args.s3_secret,
                          s3_endpoint=args.s3_endpoint, s3_prefix=prefix, namespace=args.namespace,
                          keep_job=args.keep_job, timeout_s=args.job_timeout, runtime=args.runtime,
                          elastic_min=elastic_min, elastic_max=elastic_max)


def ensure_synthetic(images: int, seed: int, imgsz: int = 256, long_tail: bool = False) -> tuple[str, bool]:
    """The embedded default dataset in data/synthetic, regenerated when the kind, size or seed asked
    for differs from what is there (the generator is deterministic, so this is cheap to keep right).
    Returns its data.yaml and whether it was generated now."""
    import json

    from trainer.data.synthetic import generate

    manifest = SYNTHETIC / "manifest.json"
    try:
        have = json.loads(manifest.read_text())
        current = have.get("complete") and (have.get("images"), have.get("seed"), have.get("imgsz"),
                                            bool(have.get("long_tail"))) == (images, seed, imgsz, long_tail)
    except (OSError, ValueError):
        current = False
    if not current:
        generate(SYNTHETIC, images=images, seed=seed, imgsz=imgsz, long_tail=long_tail)
    return str(SYNTHETIC / "data.yaml"), not current


def process_age() -> float:
    """Seconds since this process started (from /proc; 0 where there is none)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def run_local(args: argparse.Namespace) -> int:
    from kfp import local

    from pipelines.kfyolo_pipeline import DEFAULT_IMAGE, build_pipeline

    long_tail = args.synthetic == "longtail"
    data, generated = args.data, 0.0
    if not data:
        generating = time.monotonic()
        data, fresh = ensure_synthetic(args.synthetic_images, args.seed, 128 if long_tail else 256, long_tail)
        generated = time.monotonic() - generating if fresh else 0.0
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(args.root).resolve() / stamp
    root.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(args.blocks, DEFAULT_IMAGE, "local")
    params = dict(data=str(Path(data).resolve()) if not data.startswith("s3://") else data, cfg=args.cfg,
                  weights=str(Path(args.weights).resolve()) if args.weights else "", imgsz=args.imgsz,
                  batch_size=args.batch_size, epochs_per_block=args.epochs_per_block, workers=args.workers,
                  image_weights=not args.no_image_weights,
                  sampler="uniform" if args.no_image_weights else args.sampler, rfs_t=args.rfs_t,
                  cls_feedback=args.cls_feedback, val_every=args.val_every, optimizer=args.optimizer, nbs=args.nbs,
                  hyp_overrides=args.hyp_overrides, seed=args.seed,
                  device=args.device, publish=args.publish or str(root),
                  study=str(Path(args.study).resolve()) if args.study else "")
    log_path = root / "kfp-local.log"
    print(f"kfp.local run of {args.blocks} blocks x {args.epochs_per_block} epochs, {args.workers} worker(s); "
          f"data {params['data']}\nfull log: {log_path}", flush=True)
    # kfp.local notes that display names and the image don't apply locally: true, and expected here.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    real_stdout = sys.stdout
    # The clock starts with the process (interpreter, imports, the warm server's start), less the
    # one-off generation of the synthetic dataset, which later runs reuse.
    started = time.monotonic() - process_age() + generated
    progress = root / "progress.log"  # the trainer appends a line per epoch (trainer/runlog.py)
    progress.touch()
    previous = os.environ.get("KFYOLO_PROGRESS")
    os.environ["KFYOLO_PROGRESS"] = str(progress)  # the step processes inherit it
    stop_tail = threading.Event()
    tail = threading.Thread(target=tail_progress, args=(progress, real_stdout, stop_tail), daemon=True)
    tail.start()
    with log_path.open("w") as log:
        sys.stdout = printer = StepPrinter(real_stdout, log, args.verbose)
        try:
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "outputs"))
            pipeline(**params)
        except Exception as e:  # kfp.local raises RuntimeError when a task fails
            sys.stdout = real_stdout
            print(f"pipeline failed after {time.monotonic() - started:.0f} s: {e}\nsee {log_path}", file=sys.stderr)
            return 1
        finally:
            sys.stdout = real_stdout
            stop_tail.set()
            tail.join(timeout=5)
            if previous is None:
                os.environ.pop("KFYOLO_PROGRESS", None)
            else:
                os.environ["KFYOLO_PROGRESS"] = previous
    where = params["publish"].rstrip("/")
    wall = time.monotonic() - started
    print(f"done in {wall:.0f} s; report: {where}/report.html; run folder: {where}/run")
    if generated:
        print(f"(generating the synthetic dataset took {generated:.1f} s more, not counted: later runs reuse it)")
    if not where.startswith("s3://"):
        print(overhead_summary(Path(where), wall, printer.durations))
    return 0


def tail_progress(path: Path, console: TextIO, stop: threading.Event, poll_s: float = 1.0) -> None:
    """Echo the lines appended to `path` until `stop` is set: the epochs of a block as they end."""
    with path.open() as f:
        while True:
            line = f.readline()
            if line:
                stamp = datetime.datetime.now().strftime("%H:%M:%S")
                console.write(f"{stamp}      {line.rstrip()}\n")
                console.flush()
            elif stop.is_set():
                return
            else:
                stop.wait(poll_s)


def overhead_summary(published: Path, wall: float, steps: dict[str, float] | None = None) -> str:
    """How the pipeline's wall time splits: training steps and validations (results.csv's train_s and
    val_s), the evaluation steps' loops (their metrics.json seconds), and everything else: process
    start-up, imports, staging, plots, the report. With `steps` (step name -> seconds), a second
    line says where everything else went: each kind of step's time outside its loops."""
    import csv
    import json

    train = val = evaluation = 0.0
    results = published / "run" / "results.csv"
    if results.is_file():
        for row in csv.DictReader(results.open()):
            train += float(row.get("train_s") or 0)
            val += float(row.get("val_s") or 0)
    seen = set()
    for path in sorted(published.rglob("metrics.json")):  # every block's evaluation, each counted once
        record = json.loads(path.read_text())
        key = json.dumps(record.get("per_class"), sort_keys=True), record.get("seconds")
        if "seconds" in record and key not in seen:
            seen.add(key)
            evaluation += float(record["seconds"])
    rest = max(0.0, wall - train - val - evaluation)
    line = (f"time: training {train:.0f} s, validation {val:.0f} s, evaluation {evaluation:.0f} s ({len(seen)} "
            f"steps); everything else (start-up, imports, staging, plots, report) {rest:.0f} s = "
            f"{100 * rest / max(wall, 1e-9):.1f} % of {wall:.0f} s")
    if steps:
        kinds: dict[str, list[float]] = {}
        for name, took in steps.items():  # train-block, train-block-2, ... are one kind
            kinds.setdefault(re.sub(r"-\d+$", "", name), []).append(took)
        inside = {"train-block": train + val, "evaluate": evaluation}
        parts = []
        for kind, times in kinds.items():
            outside = max(0.0, sum(times) - inside.get(kind, 0.0))
            count = f" x{len(times)}" if len(times) > 1 else ""
            parts.append(f"{kind}{count} {outside:.0f} s")
        between = max(0.0, wall - sum(steps.values()))
        line += f"\n  outside the loops, by step: {', '.join(parts)}; start-up and between steps {between:.0f} s"
    return line


def build_parser() -> argparse.ArgumentParser:
    from pipelines.kfyolo_pipeline import CLUSTER_LAUNCHERS, DEFAULT_IMAGE, DEFAULT_SAMPLER

    p = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="write the pipeline YAML to upload to Kubeflow Pipelines")
    c.add_argument("--out", default="pipeline.yaml")
    c.add_argument("--blocks", type=int, default=3, help="K: training blocks, unrolled at compile time")
    c.add_argument("--image", default=DEFAULT_IMAGE, help="image every step runs in")
    c.add_argument("--launcher", default="local", choices=["local", *CLUSTER_LAUNCHERS],
                   help="where train_block runs torchrun: in its own step, as a Kubeflow PyTorchJob (training "
                   "operator v1, legacy) or as a Kubeflow Trainer v2 TrainJob")
    c.add_argument("--workers", type=int, default=2,
                   help="default of the workers parameter: processes (local) or pods per job")
    k = c.add_argument_group("cluster jobs (--launcher pytorchjob or trainjob)")
    k.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs per pod, one process each (0: CPU)")
    k.add_argument("--nproc-per-node", type=int, default=1, help="processes per pod without GPUs")
    k.add_argument("--cpu", default="4", help="CPU request per pod")
    k.add_argument("--memory", default="16Gi", help="memory request and limit per pod")
    k.add_argument("--shm-size", default="2Gi", help="/dev/shm per pod (memory-backed)")
    k.add_argument("--s3-secret", default="kfyolo-s3",
                   help="Secret with the S3 variables (k8s/s3-secret.yaml), or mlpipeline-minio-artifact")
    k.add_argument("--s3-endpoint", default="",
                   help="S3 endpoint when the Secret holds only keys (e.g. http://minio-service.kubeflow:9000)")
    k.add_argument("--s3-prefix", default="", help="s3:// folder for staging and run folders "
                   "(default s3://kfyolo/pipelines; s3://mlpipeline/kfyolo with KFP's Secret)")
    k.add_argument("--namespace", default="", help="namespace of the jobs (default: the pipeline's)")
    k.add_argument("--keep-job", action="store_true",
                   help="keep finished jobs (a PyTorchJob's TTL removes it; a TrainJob stays until deleted)")
    k.add_argument("--job-timeout", type=int, default=86400, help="seconds a block's job may run")
    k.add_argument("--elastic", default="", metavar="MIN:MAX",
                   help="PyTorchJob only: an elastic job (c10d rendezvous) of MIN to MAX pods; --workers "
                   "must lie between them (Trainer v2 has no elastic mode)")
    k.add_argument("--runtime", default="torch-distributed",
                   help="TrainJob only: the ClusterTrainingRuntime the jobs reference")
    r = sub.add_parser("run-local", help="run the pipeline here with kfp.local (SubprocessRunner)")
    r.add_argument("--data", help="data YAML, folder with data.yaml, or s3:// prefix (default: synthetic)")
    r.add_argument("--blocks", type=int, default=3)
    r.add_argument("--epochs-per-block", type=int, default=20)
    r.add_argument("--workers", type=int, default=2, help="world size: torchrun processes per block")
    r.add_argument("--imgsz", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--cfg", default="yolov5n")
    r.add_argument("--weights", default="")
    r.add_argument("--no-image-weights", action="store_true", help="uniform sampling (same as --sampler uniform)")
    r.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=["", "uniform", "classic", "rfs", "adaptive"],
                   help="per-epoch image sampler of every block (trainer/data/samplers.py)")
    r.add_argument("--rfs-t", type=float, default=0.1, help="repeat threshold of rfs and adaptive")
    r.add_argument("--cls-feedback", type=float, default=0.0, help="class loss weighted by AP deficit ** this")
    r.add_argument("--val-every", type=int, default=5, help="validate every N epochs inside a block (0: never)")
    r.add_argument("--optimizer", default="SGD", choices=["SGD", "Adam", "AdamW"])
    r.add_argument("--nbs", type=int, default=64, help="nominal batch: images per optimizer step")
    r.add_argument("--hyp-overrides", default="", help="comma-separated KEY=VALUE")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="")
    r.add_argument("--synthetic-images", type=int, default=1500, help="size of the generated default dataset")
    r.add_argument("--synthetic", default="longtail", choices=["longtail", "shapes"],
                   help="the generated default dataset: the 10-class long-tail shapes (128 px) or the 6-class shapes")
    r.add_argument("--root", default="runs/pipelines", help="local folder for outputs and the KFP log")
    r.add_argument("--publish", default="", help="also put the report and run folder here (folder or s3:// prefix); "
                   "default: the run's folder under --root")
    r.add_argument("--study", default="", help="study.json of bench/study_sampling.py: the report shows its "
                   "uniform baseline beside the run")
    r.add_argument("--verbose", action="store_true", help="show KFP's full log on the console")
    r.add_argument("--no-warm", action="store_true",
                   help="no warm process server: every step and rank imports torch itself (components/warm.py)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # run-local's warm server (components/warm.py) starts first, so that its imports overlap with
    # this process's (kfp: a second) and the first steps'; kfyolo_pipeline is imported after it.
    warm_run = argv[:1] == ["run-local"] and not {"--no-warm", "-h", "--help"} & set(argv)
    with warm.serving() if warm_run else contextlib.nullcontext():
        return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    if args.command == "compile":
        try:
            out = compile_pipeline(Path(args.out), args.blocks, args.image, args.launcher, cluster_options(args),
                                   args.workers)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {out} ({args.blocks} blocks, image {args.image}, launcher {args.launcher}); "
              "upload it in the Kubeflow Pipelines UI")
        return 0
    return run_local(args)


if __name__ == "__main__":
    sys.exit(main())
