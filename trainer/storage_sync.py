"""Datasets and run folders on S3, as the trainer uses them.

- `materialize_data("s3://bucket/prefix/data.yaml")` downloads the YAML and the files of the splits it
  names once per node into `$KFYOLO_CACHE/data/<hash>/` and returns the local YAML; the trainer then
  reads local files. Ranks on one node take turns on an `flock`; a `COMPLETE` marker, written last,
  tells a finished download from a crashed one, which is redone. The cache is keyed by the URI:
  delete the folder to fetch a changed dataset again.
- A run with `--project s3://bucket/runs` is written to a local staging folder
  `$KFYOLO_CACHE/runs/<bucket>/<key>/<name>` and mirrored by `RunSync` (rank 0) after every epoch.
- `fetch_run("s3://bucket/runs/exp/weights/last.pt")` downloads that run folder into its staging
  folder so `--resume` continues it, and the same S3 folder keeps receiving its files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.data.config import SPLITS, DataConfigError, is_image_file, read_yaml_mapping
from trainer.storage import S3Uri, Storage, StorageError

log = logging.getLogger("trainer")

COMPLETE = "COMPLETE"


def cache_root() -> Path:
    """`$KFYOLO_CACHE`, else ~/.cache/kfyolo (the label cache's default parent)."""
    env = os.environ.get("KFYOLO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kfyolo"


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on lock_path (released by the kernel if this process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish %s (lock %s)", what, lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


# ---------------------------------------------------------------------------------------- datasets

def data_yaml_uri(uri: str) -> S3Uri:
    """`s3://b/p/data.yaml` as is; `s3://b/p/` or `s3://b/p` mean `s3://b/p/data.yaml`."""
    u = S3Uri.parse(uri)
    return u if u.key.endswith((".yaml", ".yml")) else u.child("data.yaml")


def materialize_data(uri: str, storage: Storage | None = None) -> Path:
    """The local copy of an S3 data YAML and its splits, downloaded once (safe under concurrent ranks)."""
    yaml_uri = data_yaml_uri(uri)
    folder = cache_root() / "data" / hashlib.sha256(str(yaml_uri).encode()).hexdigest()[:24]
    files = folder / "files"  # mirrors the YAML's folder on S3
    local_yaml = files / posixpath.basename(yaml_uri.key)
    with exclusive(folder / ".lock", f"downloading {yaml_uri}"):
        if (folder / COMPLETE).is_file():
            return local_yaml
        shutil.rmtree(files, ignore_errors=True)  # a crashed download left no marker: start over
        storage = storage or Storage.from_env()
        base = posixpath.dirname(yaml_uri.key)
        storage.download_file(yaml_uri, local_yaml)
        raw = read_remote_yaml(local_yaml, yaml_uri)
        existing = set(storage.list(S3Uri(yaml_uri.bucket, base)))
        keys, lists = split_keys(raw, yaml_uri, existing)
        for key in lists:  # image lists name more files: fetch and read them first
            storage.download_file(S3Uri(yaml_uri.bucket, key), files / _relative(key, base))
            keys |= listed_keys(files / _relative(key, base), key, yaml_uri, existing)
        for key in sorted(keys):
            storage.download_file(S3Uri(yaml_uri.bucket, key), files / _relative(key, base))
        marker = {"uri": str(yaml_uri), "endpoint": storage.endpoint, "files": len(keys) + len(lists) + 1}
        (folder / f".{COMPLETE}.tmp").write_text(json.dumps(marker))
        os.replace(folder / f".{COMPLETE}.tmp", folder / COMPLETE)
        log.info("downloaded %s (%d files) to %s", yaml_uri, marker["files"], files)
    return local_yaml


def read_remote_yaml(local: Path, uri: S3Uri) -> dict[str, Any]:
    return read_yaml_mapping(local, str(uri))


def _relative(key: str, base: str) -> str:
    return key[len(base) + 1:] if base else key


def _inside(base: str, parent: str, entry: Any, uri: S3Uri, what: str) -> str:
    """parent/entry as a normalised key that must stay inside the YAML's folder `base`."""
    if not isinstance(entry, str) or not entry.strip():
        raise DataConfigError(f"{uri}: {what}: expected a relative path, got {entry!r}")
    if entry.startswith(("/", "~", "s3://")) or "://" in entry or "\\" in entry:
        raise DataConfigError(f"{uri}: {what}: {entry!r} is absolute; a data YAML on S3 must use paths relative "
                              "to its own folder")
    key = posixpath.normpath(posixpath.join(parent, entry)) if parent else posixpath.normpath(entry)
    key = "" if key == "." else key
    if key.startswith("..") or (base and key != base and not key.startswith(base + "/")):
        raise DataConfigError(f"{uri}: {what}: {entry!r} resolves outside the YAML's folder "
                              f"s3://{uri.bucket}/{base}")
    return key


def split_keys(raw: dict[str, Any], uri: S3Uri, existing: set[str]) -> tuple[set[str], list[str]]:
    """The keys the splits need (folders in full, image files, their label files) and the .txt lists
    still to be read. `existing` is every key under the YAML's folder."""
    from trainer.data.labels import label_path_for  # the YOLO images/ -> labels/ convention, one place

    base = posixpath.dirname(uri.key)
    root = base if raw.get("path") in (None, "") else _inside(base, base, str(raw["path"]), uri, "key 'path'")
    keys: set[str] = set()
    lists: list[str] = []
    for split in SPLITS:
        value = raw.get(split)
        for entry in ([] if value in (None, "") else value if isinstance(value, list) else [value]):
            key = _inside(base, root, entry, uri, f"key {split!r}")
            under = [k for k in existing if k.startswith(key + "/") or not key]
            if key in existing and key.lower().endswith(".txt"):
                lists.append(key)
            elif key in existing:
                keys.add(key)
            elif under:
                keys.update(under)
            else:
                raise DataConfigError(f"{uri}: key {split!r}: s3://{uri.bucket}/{key} does not exist")
    images = [k for k in keys if is_image_file(Path(k))]
    keys.update(lbl for lbl in (str(label_path_for(k)) for k in images) if lbl in existing)
    return keys, lists


def listed_keys(local_list: Path, list_key: str, uri: S3Uri, existing: set[str]) -> set[str]:
    """Images named in a downloaded .txt list (relative to the list's folder) and their labels."""
    from trainer.data.labels import label_path_for

    base, folder = posixpath.dirname(uri.key), posixpath.dirname(list_key)
    keys = set()
    for lineno, line in enumerate(local_list.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key = _inside(base, folder, line, uri, f"s3://{uri.bucket}/{list_key}:{lineno}")
        if key in existing:  # a missing image is left for the label scan to report
            keys.add(key)
            label = str(label_path_for(key))
            if label in existing:
                keys.add(label)
    return keys


# ---------------------------------------------------------------------------------------- runs

def staging_dir(project: str, name: str) -> Path:
    """The local folder a run under `project` (s3://bucket/prefix) is written to before upload."""
    u = S3Uri.parse(project)
    return cache_root() / "runs" / u.bucket / u.key.strip("/") / name


def next_remote_run_dir(project: str, name: str, exist_ok: bool, storage: Storage | None = None) -> Path:
    """Staging folder of project/name, or of the first name2, name3, ... free both on S3 and locally
    (a leftover staging folder may hold the only copy of a run whose upload failed)."""
    if exist_ok:
        return staging_dir(project, name)
    storage = storage or Storage.from_env()
    taken = {k[len(S3Uri.parse(project).prefix):].rstrip("/") for k in storage.list(project, recursive=False)}

    def free(candidate: str) -> bool:
        local = staging_dir(project, candidate)
        return candidate not in taken and not (local.is_dir() and any(local.iterdir()))

    n, candidate = 2, name
    while not free(candidate):
        candidate, n = f"{name}{n}", n + 1
    return staging_dir(project, candidate)


def _syncable(path: Path) -> bool:
    # Dotfiles are in-flight temporaries (checkpoints are written to .last.pt.*.tmp, then renamed).
    return not path.name.startswith(".") and not path.name.endswith((".tmp", ".part"))


class RunSync:
    """Mirrors a local run folder to `uri`; rank 0 calls `push()` after every epoch and at the end."""

    def __init__(self, local_dir: Path, uri: str, storage: Storage | None = None):
        self.local_dir = Path(local_dir)
        self.uri = str(S3Uri.parse(uri.rstrip("/") + "/"))
        self.storage = storage or Storage.from_env()

    def push(self) -> list[str]:
        """Upload the files that changed since the last push; the URIs uploaded."""
        try:
            return self.storage.upload_dir(self.local_dir, self.uri, only_changed=True, include=_syncable)
        except StorageError as e:
            raise StorageError(f"{e}. Syncing the run folder to {self.uri} failed; the local staging folder "
                               f"{self.local_dir} keeps every file") from e


def fetch_run(checkpoint: str, storage: Storage | None = None) -> tuple[Path, str, str]:
    """Download the run folder of `s3://.../<name>/weights/last.pt` into its staging folder, once per
    node and checkpoint version. Returns (local checkpoint, project URI, run name)."""
    u = S3Uri.parse(checkpoint)
    run_key = posixpath.dirname(posixpath.dirname(u.key))
    if not run_key or posixpath.basename(posixpath.dirname(u.key)) != "weights":
        raise StorageError(f"--resume {checkpoint}: expected s3://bucket/<project>/<name>/weights/<file>.pt")
    project, name = f"s3://{u.bucket}/{posixpath.dirname(run_key)}", posixpath.basename(run_key)
    local_dir = staging_dir(project, name)
    local = local_dir / u.key[len(run_key) + 1:]
    with exclusive(local_dir.parent / f".{name}.lock", f"downloading the run {project}/{name}"):
        storage = storage or Storage.from_env()
        info = storage.stat(u)
        if info is None:
            raise StorageError(f"--resume {checkpoint}: no such object at endpoint {storage.endpoint}")
        stamp = local_dir.parent / f".{name}.fetched"
        token = json.dumps({"uri": str(u), "etag": info.etag, "size": info.size})
        if not (local.is_file() and stamp.is_file() and stamp.read_text() == token):
            files = storage.download_dir(S3Uri(u.bucket, run_key), local_dir)
            stamp.write_text(token)
            log.info("downloaded %s/%s (%d files) to %s", project, name, len(files), local_dir)
    return local, project, name
