"""How a training block runs: the request (what to train) and the launchers (where).

`local` runs `torchrun --nproc_per_node N` subprocesses on this machine (gloo on CPU, nccl on
GPUs). `pytorchjob` (pytorchjob.py) and `trainjob` (trainjob.py) run the same trainer command line
as a Kubeflow PyTorchJob or a Kubeflow Trainer v2 TrainJob, through one shared path (clusterjob.py,
its S3 side staging.py).
All take a `TrainRequest` and leave the block's run folder in `request.run_dir`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path


class TrainLaunchError(RuntimeError):
    """The training block failed; the message carries the reason and the end of its log."""


@dataclass(frozen=True)
class TrainRequest:
    run_dir: Path                  # this block's run folder (a copy of the previous block's when resuming)
    data_yaml: str
    block: int                     # 0-based
    blocks: int
    epochs_per_block: int
    cfg: str = "yolov5n"
    weights: str = ""              # pretrained weights for block 0
    imgsz: int = 640
    batch_size: int = 16           # total over all ranks
    optimizer: str = "SGD"
    nbs: int = 64                  # nominal batch of an optimizer step
    world_size: int = 1            # processes (local) or nodes x processes (cluster jobs)
    image_weights: bool = True     # --image-weights (the classic sampler) when `sampler` is ""
    sampler: str = ""              # uniform, classic, rfs or adaptive (see trainer/data/samplers.py)
    rfs_t: float = 0.1
    cls_feedback: float = 0.0      # class loss weighted by the AP deficit ** this; 0 = off
    val_every: int = 0             # validations inside the block refresh maps; 0 = only the schedule's last
    hyp_overrides: tuple[str, ...] = ()   # KEY=VALUE
    seed: int = 0
    class_weights: str = ""        # class_weights.json
    maps: str = ""                 # maps.json of the previous block's evaluation
    device: str = ""
    workers: int = 8
    extra: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not 0 <= self.block < self.blocks:
            raise ValueError(f"block {self.block} outside 0..{self.blocks - 1}")
        if self.epochs_per_block < 1 or self.world_size < 1:
            raise ValueError("epochs_per_block and world_size must be >= 1")
        if self.batch_size % self.world_size:
            raise ValueError(f"batch size {self.batch_size} must be a multiple of the world size {self.world_size}")

    @property
    def resumes(self) -> bool:
        return self.block > 0

    @property
    def stop_epoch(self) -> int:
        return (self.block + 1) * self.epochs_per_block

    def trainer_args(self, run_dir: str | None = None) -> list[str]:
        """`python -m trainer.train` arguments for this block. `run_dir` replaces the local run
        folder (e.g. with an s3:// location when the block runs elsewhere)."""
        where = run_dir or str(self.run_dir)
        # results.png once, by the last block (the curves of every block are in results.csv, TensorBoard
        # and the report): 0.5-0.9 s of matplotlib saved in each earlier block
        common = ["--stop-epoch", str(self.stop_epoch), "--workers", str(self.workers), "--results-plot", "end"]
        common += ["--device", self.device] if self.device else []
        common += ["--class-weights", self.class_weights] if self.class_weights else []
        common += ["--maps", self.maps] if self.maps else []
        if self.resumes:
            return ["--resume", f"{where.rstrip('/')}/weights/last.pt", *common, *self.extra]
        parent, _, name = where.rstrip("/").rpartition("/")
        args = ["--data", self.data_yaml, "--cfg", self.cfg, "--imgsz", str(self.imgsz),
                "--batch-size", str(self.batch_size), "--optimizer", self.optimizer, "--nbs", str(self.nbs), "--epochs", str(self.blocks * self.epochs_per_block),
                "--seed", str(self.seed), "--project", parent or ".", "--name", name, "--exist-ok",
                "--patience", "0", "--auto-resume", *common]  # a restarted pod resumes its last.pt
        args += ["--val-every", str(self.val_every)] if self.val_every > 0 else ["--noval"]
        args += ["--weights", self.weights] if self.weights else []
        if self.sampler:
            args += ["--sampler", self.sampler, "--rfs-t", f"{self.rfs_t:g}"]
        elif self.image_weights:
            args += ["--image-weights"]
        args += ["--cls-feedback", f"{self.cls_feedback:g}"] if self.cls_feedback else []
        for item in self.hyp_overrides:
            args += ["--hyp-override", item]
        return [*args, *self.extra]


def parse_hyp_overrides(text: str) -> tuple[str, ...]:
    """'lr0=0.02, mosaic=0.5' -> ('lr0=0.02', 'mosaic=0.5'); each item must be KEY=VALUE."""
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"hyp override {item!r} must look like KEY=VALUE")
    return items


def seed_block_folder(run_dir: Path, previous_model: Path | None, previous_evaluation: Path | None,
                      block: int) -> None:
    """Start this block's run folder: a copy of the previous block's (checkpoints, results.csv,
    TensorBoard events, weighting records), plus the previous evaluation under evaluations/, so the
    last block's folder tells the whole story. Upstream artifacts are never modified."""
    if previous_model is not None:
        if not (previous_model / "weights" / "last.pt").is_file():
            raise TrainLaunchError(f"block {block}: previous block's model {previous_model} has no weights/last.pt")
        shutil.copytree(previous_model, run_dir, dirs_exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if previous_evaluation is not None:
        shutil.copytree(previous_evaluation, run_dir / "evaluations" / f"block{block - 1}", dirs_exist_ok=True)
