"""Checkpoints: atomic writes, weights_only loads, clear errors."""

import os

import pytest
import torch

from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _ckpt(v=1.0):
    return {"model": {"w": torch.full((3,), v)}, "spec": {"name": "x"}, "names": ["a"], "epoch": 0}


def test_round_trip_with_weights_only(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "w" / "last.pt")
    ck = load_checkpoint(path)
    assert torch.equal(ck["model"]["w"], torch.ones(3))
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    torch.load(path, weights_only=True)  # plain dict of tensors and primitives


def test_a_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(_ckpt(1.0), tmp_path / "last.pt")
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.write(b"partial")
        raise KeyboardInterrupt  # e.g. the pod is killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_ckpt(2.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    good = save_checkpoint(_ckpt(), tmp_path / "good.pt")
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pt: unreadable"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a kfyolo checkpoint"):
        load_checkpoint(other)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "spec": {}, "names": []}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def _mount_tmpfs(where, *options: str) -> bool:
    """A small tmpfs (root only): False when this machine does not allow it."""
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    import subprocess

    from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=2m"):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        small = {"model": {"w": torch.zeros(1000)}, "spec": {}, "names": ["a"]}
        save_checkpoint(small, disk / "last.pt")
        big = {"model": {"w": torch.zeros(1_000_000)}, "spec": {}, "names": ["a"]}  # 4 MB
        with pytest.raises(CheckpointError) as e:
            save_checkpoint(big, disk / "last.pt")
        text = str(e.value)
        assert "\n" not in text and "last.pt: no space left on device" in text and "MB free" in text
        assert torch.equal(load_checkpoint(disk / "last.pt")["model"]["w"], small["model"]["w"])
        assert [p.name for p in disk.iterdir()] == ["last.pt"]  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_write_failure_finds_the_cause_torch_buries():
    """torch.save into a full device raises a RuntimeError ('unexpected pos') chained to ENOSPC."""
    from pathlib import Path

    from trainer.checkpoint import write_failure

    with pytest.raises(Exception) as e:
        with open("/dev/full", "wb") as f:
            torch.save({"w": torch.zeros(100_000)}, f)
            f.flush()
    assert "no space left on device" in write_failure(Path("/nowhere/last.pt"), e.value)


def test_a_read_only_project_fails_before_any_work(tmp_path, synthetic_yaml, capsys):
    import subprocess

    from trainer.train import main

    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "size=1m", "ro"):
        pytest.skip("mounting a read-only tmpfs needs root")
    try:
        assert main(["--data", str(synthetic_yaml), "--project", str(ro), "--epochs", "1", "--imgsz", "64",
                     "--device", "cpu", "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert f"--project {ro}: cannot write the run folder {ro}/exp (Read-only file system)" in err
        assert "images kept" not in err  # refused before the data scan
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
