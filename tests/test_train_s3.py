"""The trainer on S3 (moto on loopback): datasets materialised once per node, run folders staged
locally and mirrored after every epoch, and resuming from an s3:// checkpoint."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import time
from pathlib import Path

import pytest
import yaml
from s3server import materialize_worker, upload_tree

from trainer.checkpoint import load_checkpoint
from trainer.data.config import DataConfigError, load_data_config, resolve_split
from trainer.storage import RetryPolicy, S3Config, S3Uri, Storage, StorageError
from trainer.storage_sync import (RunSync, cache_root, data_yaml_uri, fetch_run, materialize_data,
                                  next_remote_run_dir, split_keys, staging_dir)
from trainer.train import main

YAML = S3Uri("kfyolo", "ds/data.yaml")


def _storage() -> Storage:
    return Storage.from_env(RetryPolicy(attempts=3, base_delay=0.02))


def _upload_dataset(root: Path, prefix: str = "s3://kfyolo/datasets/syn") -> Storage:
    st = _storage()
    st.upload_dir(root, prefix)
    return st


# ---------------------------------------------------------------------------------------- planning

def test_split_keys_take_folders_files_and_their_labels():
    existing = {"ds/data.yaml", "ds/images/train/a.jpg", "ds/images/train/b.png", "ds/labels/train/a.txt",
                "ds/labels/train/b.txt", "ds/images/val/c.jpg", "ds/labels/val/c.txt", "ds/labels/val/zz.txt",
                "ds/extra/e.jpg", "ds/extra/e.txt", "ds/lists/val.txt", "other/x.jpg"}
    raw = {"path": ".", "train": "images/train", "val": ["images/val/c.jpg", "lists/val.txt"], "test": "extra/e.jpg"}
    keys, lists = split_keys(raw, YAML, existing)
    assert lists == ["ds/lists/val.txt"]
    assert keys == {"ds/images/train/a.jpg", "ds/images/train/b.png", "ds/labels/train/a.txt",
                    "ds/labels/train/b.txt", "ds/images/val/c.jpg", "ds/labels/val/c.txt", "ds/extra/e.jpg",
                    "ds/extra/e.txt"}  # a label beside its image; no stray labels, nothing outside ds/
    assert data_yaml_uri("s3://kfyolo/ds/") == YAML == data_yaml_uri("s3://kfyolo/ds")
    assert data_yaml_uri("s3://kfyolo/ds/coco.yml").key == "ds/coco.yml"


@pytest.mark.parametrize("raw, match", [
    ({"path": "/data/coco", "train": "a", "val": "a"}, "'/data/coco' is absolute"),
    ({"path": "~/coco", "train": "a", "val": "a"}, "is absolute"),
    ({"train": "s3://other/a", "val": "a"}, "is absolute"),
    ({"path": "..", "train": "a", "val": "a"}, "resolves outside the YAML's folder s3://kfyolo/ds"),
    ({"train": "../other/a", "val": "images"}, "key 'train': '../other/a' resolves outside"),
    ({"train": "images", "val": "nope"}, "key 'val': s3://kfyolo/ds/nope does not exist"),
    ({"train": "images", "val": 3}, "expected a relative path"),
])
def test_split_keys_reject_absolute_escaping_and_missing_entries(raw, match):
    with pytest.raises(DataConfigError, match=match):
        split_keys(raw, YAML, {"ds/data.yaml", "ds/images/a.jpg", "other/a/x.jpg"})


# ---------------------------------------------------------------------------------------- datasets

def test_two_processes_materialise_a_dataset_once(s3, tmp_path, synthetic_yaml):
    _upload_dataset(synthetic_yaml.parent)
    n_files = len([p for p in synthetic_yaml.parent.rglob("*") if p.is_file() and p.name != "manifest.json"])
    calls = tmp_path / "calls.txt"
    calls.touch()
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as torchrun's ranks are
    with ctx.Pool(2) as pool:
        got = pool.starmap(materialize_worker, [("s3://kfyolo/datasets/syn/data.yaml", str(calls))] * 2)
    downloads = calls.read_text().splitlines()
    assert got[0] == got[1]
    assert len(downloads) == len(set(downloads)) == n_files  # every file once, by one of the two
    local = load_data_config(got[0])
    original = load_data_config(synthetic_yaml)
    for split in ("train", "val"):
        names = [p.relative_to(local.root) for p in resolve_split(local.split(split))]
        assert names == [p.relative_to(original.root) for p in resolve_split(original.split(split))]
        assert len(names) == {"train": 24, "val": 8}[split]
    assert (Path(got[0]).parents[1] / "COMPLETE").is_file()
    assert not (Path(got[0]).parent / "manifest.json").exists()  # not named by the YAML


def test_a_crashed_download_is_redone_and_a_complete_one_reused(s3, tmp_path):
    upload_tree(tmp_path / "ds", {"data.yaml": b"train: images/train\nval: images/train\nnames: [a]\n",
                                  "images/train/x.jpg": b"jpg", "labels/train/x.txt": b"0 0.5 0.5 0.1 0.1\n"})
    st = _upload_dataset(tmp_path / "ds", "s3://kfyolo/ds")
    half = materialize_data("s3://kfyolo/ds/", st)
    folder = half.parents[1]
    (folder / "COMPLETE").unlink()  # as if the process died before the marker
    (half.parent / "images" / "train" / "x.jpg").write_bytes(b"jp")  # truncated file
    (half.parent / "stray").write_text("left over")
    assert materialize_data("s3://kfyolo/ds/data.yaml", st) == half
    assert (half.parent / "images" / "train" / "x.jpg").read_bytes() == b"jpg"
    assert not (half.parent / "stray").exists()
    assert json.loads((folder / "COMPLETE").read_text())["files"] == 3

    s3.stop()  # a completed download is reused without asking the server
    assert materialize_data("s3://kfyolo/ds", st) == half
    assert folder.parent == cache_root() / "data"


def test_materialising_a_missing_dataset_names_it(s3):
    with pytest.raises(StorageError, match="s3://kfyolo/none/data.yaml does not exist"):
        materialize_data("s3://kfyolo/none/")


# ---------------------------------------------------------------------------------------- runs

def test_run_names_increment_over_s3_and_leftover_staging(s3, tmp_path):
    st = _storage()
    upload_tree(tmp_path / "r", {"exp/results.csv": b"x", "exp2/weights/last.pt": b"x", "expert/a": b"x"})
    st.upload_dir(tmp_path / "r", "s3://kfyolo/runs")
    assert next_remote_run_dir("s3://kfyolo/runs", "exp", False, st) == staging_dir("s3://kfyolo/runs", "exp3")
    leftover = staging_dir("s3://kfyolo/runs", "exp3")  # a run whose upload failed keeps its name
    leftover.mkdir(parents=True)
    assert next_remote_run_dir("s3://kfyolo/runs", "exp", False, st).name == "exp3"
    (leftover / "results.csv").write_text("x")
    assert next_remote_run_dir("s3://kfyolo/runs", "exp", False, st).name == "exp4"
    assert next_remote_run_dir("s3://kfyolo/runs/", "exp", True, st).name == "exp"
    assert next_remote_run_dir("s3://kfyolo/fresh", "exp", False, st) == cache_root() / "runs/kfyolo/fresh/exp"


def test_run_sync_skips_temporaries_and_a_failed_push_says_where_the_files_are(s3, tmp_path):
    upload_tree(tmp_path / "run", {"results.csv": b"1", "weights/.last.pt.abc.tmp": b"half", "weights/last.pt": b"w"})
    sync = RunSync(tmp_path / "run", "s3://kfyolo/runs/exp", _storage())
    assert sorted(sync.push()) == ["s3://kfyolo/runs/exp/results.csv", "s3://kfyolo/runs/exp/weights/last.pt"]
    assert sync.push() == []
    (tmp_path / "run" / "results.csv").write_text("12")
    s3.stop()
    with pytest.raises(StorageError, match=rf"the local staging folder {tmp_path / 'run'} keeps every file"):
        sync.push()


def test_fetch_run_checks_the_checkpoint_path(s3):
    for bad in ("s3://kfyolo/last.pt", "s3://kfyolo/weights/last.pt", "s3://kfyolo/runs/exp/last.pt"):
        with pytest.raises(StorageError, match="expected s3://bucket/<project>/<name>/weights/<file>.pt"):
            fetch_run(bad)
    with pytest.raises(StorageError, match="no such object"):
        fetch_run("s3://kfyolo/runs/exp/weights/last.pt")


def _rows(st: Storage, key: str, tmp: Path) -> list[dict[str, str]]:
    text = st.download_file(f"s3://kfyolo/{key}", tmp / key.replace("/", "_")).read_text()
    return list(csv.DictReader(io.StringIO(text)))


def test_train_from_s3_data_into_an_s3_project_then_resume_it(s3, tmp_path, synthetic_yaml):
    st = _upload_dataset(synthetic_yaml.parent)
    flags = ["--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4", "--device", "cpu", "--workers", "0",
             "--epochs", "2", "--seed", "1"]
    started = time.monotonic()
    assert main(["--data", "s3://kfyolo/datasets/syn/data.yaml", "--project", "s3://kfyolo/runs",
                 "--stop-epoch", "1", *flags]) == 0
    keys = st.list("s3://kfyolo/runs/exp")
    for f in ("weights/last.pt", "weights/best.pt", "results.csv", "results.png", "hyp.yaml", "opt.yaml",
              "train_batch0.jpg", "dataset_report.json", "maps.json"):
        assert f"runs/exp/{f}" in keys, f
    assert any(k.startswith("runs/exp/events.out.tfevents.") for k in keys)
    assert not any("/." in k or k.endswith(".tmp") for k in keys)
    ckpt = load_checkpoint(st.download_file("s3://kfyolo/runs/exp/weights/last.pt", tmp_path / "last.pt"))
    assert ckpt["epoch"] == 0 and ckpt["opt"]["data"] == "s3://kfyolo/datasets/syn/data.yaml"
    assert ckpt["names"][5] == "hexagon"
    opt = yaml.safe_load(st.download_file("s3://kfyolo/runs/exp/opt.yaml", tmp_path / "opt.yaml").read_text())
    assert opt["project"] == "s3://kfyolo/runs" and opt["data"].startswith("s3://")
    assert len(_rows(st, "runs/exp/results.csv", tmp_path)) == 1

    assert main(["--resume", "s3://kfyolo/runs/exp/weights/last.pt", "--workers", "0"]) == 0
    assert not st.list("s3://kfyolo/runs/exp2")  # the same S3 run folder, continued
    assert [r["epoch"] for r in _rows(st, "runs/exp/results.csv", tmp_path)] == ["0", "1"]
    last = load_checkpoint(st.download_file("s3://kfyolo/runs/exp/weights/last.pt", tmp_path / "last2.pt"))
    assert last["epoch"] == 1 and last["opt"]["resume"] == "s3://kfyolo/runs/exp/weights/last.pt"
    best = load_checkpoint(st.download_file("s3://kfyolo/runs/exp/weights/best.pt", tmp_path / "best.pt"))
    assert best["optimizer"] is None  # stripped by finish() after the full schedule, then uploaded
    events = [k for k in st.list("s3://kfyolo/runs/exp") if "tfevents" in k]
    assert len(events) == 2  # the first block's and the resumed block's
    assert time.monotonic() - started < 120


def test_a_failed_upload_fails_the_run_and_names_the_staging_folder(s3, tmp_path, monkeypatch, capsys):
    """The store goes away once setup has named the run: the first push fails after its retries."""
    import trainer.fit
    from trainer.data.synthetic import generate

    data = generate(tmp_path / "tiny", images=8, seed=3, imgsz=64)
    fast = RetryPolicy(attempts=2, base_delay=0.02)
    monkeypatch.setattr(Storage, "from_env", classmethod(lambda cls, retry=None, **kw: cls(S3Config.from_env(), fast)))
    real_run_epochs = trainer.fit.run_epochs

    def outage_then_run_epochs(run):
        s3.stop()
        return real_run_epochs(run)

    monkeypatch.setattr(trainer.fit, "run_epochs", outage_then_run_epochs)
    code = main(["--data", str(data), "--project", "s3://kfyolo/runs", "--cfg", "yolov5n", "--imgsz", "64",
                 "--batch-size", "4", "--device", "cpu", "--workers", "0", "--epochs", "1"])
    err = capsys.readouterr().err
    staged = staging_dir("s3://kfyolo/runs", "exp")
    assert code == 1
    assert "unreachable or failing after 2 attempts" in err and "s3://kfyolo/runs/exp/" in err
    assert f"the local staging folder {staged} keeps every file" in err
    assert (staged / "weights" / "last.pt").is_file() and (staged / "results.csv").is_file()


def test_bad_s3_flags_and_a_missing_environment_are_clear_errors(monkeypatch, capsys):
    assert main(["--data", "s3://Bad_Bucket/data.yaml", "--device", "cpu"]) == 2
    assert "--data: s3://Bad_Bucket: invalid bucket name" in capsys.readouterr().err
    for var in ("S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert main(["--data", "s3://kfyolo/ds/data.yaml", "--device", "cpu", "--imgsz", "64"]) == 1
    err = capsys.readouterr().err
    assert "S3_ENDPOINT" in err and "AWS_ACCESS_KEY_ID" in err and "AWS_SECRET_ACCESS_KEY" in err
