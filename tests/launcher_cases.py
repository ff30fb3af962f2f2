"""What the PyTorchJob and TrainJob launcher tests share: a block request, job options, the staged
dataset, S3 without retries, and what a job's rank 0 leaves on S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.launchers import TrainRequest
from components.launchers.clusterjob import JobOptions, plan_for
from trainer.checkpoint import save_checkpoint
from trainer.storage import RetryPolicy, Storage


def job_options(default_run_id: str, **kw) -> JobOptions:
    """JobOptions for a test; `run_id` in kw overrides the file's default."""
    return JobOptions(**{"run_id": default_run_id, "image": "registry.example/kfyolo:0.1.0", "s3_prefix": "s3://kfyolo/jobs",
                         "nodes": 2, "poll_s": 1.0, **kw})


def block_request(tmp_path: Path, block: int = 0, world_size: int = 2) -> TrainRequest:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cw = tmp_path / "class_weights.json"
    cw.write_text(json.dumps({"class_weights": [0.5, 0.5]}))
    run_dir = tmp_path / f"model{block}"
    if block:  # the previous block's run folder, as seed_block_folder leaves it
        save_checkpoint({"model": {}, "spec": {}, "names": [], "epoch": block - 1}, run_dir / "weights" / "last.pt")
    return TrainRequest(run_dir=run_dir, data_yaml="unused", block=block, blocks=3, epochs_per_block=2, batch_size=12,
                        world_size=world_size, class_weights=str(cw), maps=str(cw) if block else "")


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "dataset"
    (root / "images" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: {0: a, 1: b}\n")
    (root / "images" / "train" / "x.jpg").write_bytes(b"jpg")
    return root


def storage() -> Storage:
    return Storage.from_env(RetryPolicy(attempts=1))


def pods_write(request: TrainRequest, opts: JobOptions, epoch: int | None = None):
    """on_create: what the job's rank 0 leaves on S3 (the block's checkpoint and records)."""
    def write(job):
        plan, tmp = plan_for(request, opts), request.run_dir.parent / "pod-out"
        save_checkpoint({"model": {}, "spec": {}, "names": [], "epoch": request.stop_epoch - 1 if epoch is None
                         else epoch}, tmp / "weights" / "last.pt")
        (tmp / "results.csv").write_text("epoch\n0\n1\n")
        storage().upload_dir(tmp, plan.run_uri)
    return write
