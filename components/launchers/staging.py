"""A cluster job's data on S3: where a block's job finds it (`JobPlan`), staging it before the job,
fetching the pod's inputs inside it and the run folder after it, and the same by hand (`main`).

The job's pods are not KFP tasks and see no KFP artifacts, so data and checkpoints travel through S3;
the run's folder is <s3_prefix>/kfyolo-<run id>/ (clusterjob.plan_for). Kubernetes is not needed
here: the pod's `fetch` step imports only this and trainer.storage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from components.launchers import TrainLaunchError, TrainRequest
from trainer.storage import S3Uri, Storage, StorageError


@dataclass(frozen=True)
class JobPlan:
    """The name and S3 locations of one block's job."""

    name: str
    stage: str                    # s3://bucket/prefix/kfyolo-<run>: shared by the run's blocks
    block: int

    @property
    def dataset_uri(self) -> str:
        return f"{self.stage}/dataset"

    @property
    def inputs_uri(self) -> str:
        return f"{self.stage}/block{self.block}/inputs"

    @property
    def run_uri(self) -> str:
        return f"{self.stage}/block{self.block}/run"


def stage_inputs(storage: Storage, request: TrainRequest, plan: JobPlan, dataset_dir: Path) -> None:
    """Put on S3 what the pods read (see the module docstring)."""
    if not (dataset_dir / "data.yaml").is_file():
        raise TrainLaunchError(f"block {request.block}: dataset {dataset_dir} has no data.yaml")
    prefix = S3Uri.parse(plan.dataset_uri).prefix
    have = set(storage.list(plan.dataset_uri))  # objects appear only once complete: present means whole
    storage.upload_dir(dataset_dir, plan.dataset_uri, only_changed=False,
                       include=lambda p: prefix + p.relative_to(dataset_dir).as_posix() not in have)
    if request.class_weights:
        storage.upload_file(request.class_weights, f"{plan.inputs_uri}/class_weights.json")
    if request.maps:
        storage.upload_file(request.maps, f"{plan.inputs_uri}/maps.json")
    if request.resumes:  # not this block's own log, which is being written (and comes back with the folder)
        own_log = f"train_block{request.block}.log"
        storage.upload_dir(request.run_dir, plan.run_uri, only_changed=False, include=lambda p: p.name != own_log)


def fetch_outputs(storage: Storage, request: TrainRequest, plan: JobPlan, kind: str = "PyTorchJob") -> int:
    """Download the block's run folder into request.run_dir and check its checkpoint reached the
    block's last epoch (a job that 'succeeded' without training must not pass). Returns the file count."""
    from trainer.checkpoint import CheckpointError, load_checkpoint

    files = storage.download_dir(plan.run_uri, request.run_dir)
    last = request.run_dir / "weights" / "last.pt"
    if last not in files:
        raise TrainLaunchError(f"{kind} {plan.name} succeeded but left no weights/last.pt in {plan.run_uri}")
    try:
        epoch = load_checkpoint(last)["epoch"]
    except CheckpointError as e:
        raise TrainLaunchError(f"{kind} {plan.name}: {e}") from e
    if epoch != request.stop_epoch - 1:
        raise TrainLaunchError(f"{kind} {plan.name} succeeded but its checkpoint {plan.run_uri}/weights/last.pt "
                               f"is at epoch {epoch}, not the block's last epoch {request.stop_epoch - 1}")
    return len(files)


def fetch_inputs(pairs: Sequence[tuple[str, str]], storage: Storage | None = None) -> None:
    """The pod's first step: download each S3 object to its local path."""
    storage = storage or Storage.from_env()
    for uri, path in pairs:
        storage.download_file(uri, path)


def upload_folder(local: Path, prefix: str, create_bucket: bool = False, storage: Storage | None = None) -> int:
    """Put a local folder (e.g. a dataset for k8s/pytorchjob.yaml) under an s3:// prefix; the file count."""
    if not local.is_dir():
        raise StorageError(f"{local} is not a folder")
    storage = storage or Storage.from_env()
    bucket = S3Uri.parse(prefix).bucket
    if create_bucket:  # Storage moves objects only; a bucket is made once, here, with the same settings
        import urllib3
        from minio import Minio
        from minio.error import MinioException

        cfg = storage.config
        client = Minio(cfg.endpoint, access_key=cfg.access_key, secret_key=cfg.secret_key, secure=cfg.secure,
                       region=cfg.region)
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
        except (MinioException, urllib3.exceptions.HTTPError) as e:
            raise StorageError(f"creating bucket '{bucket}' at {storage.endpoint} failed: {type(e).__name__}") from e
    return len(storage.upload_dir(local, prefix, only_changed=False))



def main(argv: Sequence[str] | None = None, prog: str = "python -m components.launchers.staging") -> int:
    """The launchers' S3 staging by hand (credentials from the environment, as everywhere):

    python -m components.launchers.staging fetch URI PATH [URI PATH ...]      (the pod's first step)
    python -m components.launchers.staging upload FOLDER s3://bucket/prefix [--create-bucket]
    """
    p = argparse.ArgumentParser(prog=prog, description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download S3 objects to local paths (the pod's inputs)")
    f.add_argument("pairs", nargs="+", metavar="URI PATH")
    u = sub.add_parser("upload", help="upload a folder (e.g. a dataset) under an s3:// prefix")
    u.add_argument("folder", type=Path)
    u.add_argument("prefix", help="s3://bucket/prefix")
    u.add_argument("--create-bucket", action="store_true", help="create the bucket when it does not exist")
    args = p.parse_args(argv)
    if args.command == "fetch" and len(args.pairs) % 2:
        p.error("fetch takes URI PATH pairs")
    try:
        if args.command == "fetch":
            fetch_inputs(list(zip(args.pairs[::2], args.pairs[1::2])))
        else:
            n = upload_folder(args.folder, args.prefix, args.create_bucket)
            print(f"uploaded {n} files from {args.folder} to {args.prefix.rstrip('/')}/")
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
