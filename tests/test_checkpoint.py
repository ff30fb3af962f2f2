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
