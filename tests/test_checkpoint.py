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


def test_background_writer_keeps_order_and_best_is_a_link_that_survives_the_next_last(tmp_path):
    """CheckpointWriter: writes land in the order given; best.pt is last.pt's file (a hard link,
    no second serialisation) until the next last.pt replaces its own name, and then keeps the
    epoch it was linked at."""
    from trainer.checkpoint import CheckpointWriter

    writer = CheckpointWriter()
    weights = tmp_path / "weights"
    for epoch in range(4):
        ckpt = {**_ckpt(float(epoch)), "epoch": epoch}
        writer.write(ckpt, weights / "last.pt", links=[weights / "best.pt"] if epoch in (0, 2) else [])
    writer.wait()
    assert load_checkpoint(weights / "last.pt")["epoch"] == 3
    best = load_checkpoint(weights / "best.pt")
    assert best["epoch"] == 2 and torch.equal(best["model"]["w"], torch.full((3,), 2.0))
    assert (weights / "best.pt").stat().st_ino != (weights / "last.pt").stat().st_ino
    writer.write(_ckpt(9.0), weights / "last.pt", links=[weights / "best.pt"])
    writer.close()
    assert (weights / "best.pt").stat().st_ino == (weights / "last.pt").stat().st_ino
    assert sorted(p.name for p in weights.iterdir()) == ["best.pt", "last.pt"]  # no temporary files


def test_a_failed_background_write_is_raised_by_the_next_call_and_loses_nothing(tmp_path):
    from trainer.checkpoint import CheckpointWriter

    writer = CheckpointWriter()
    writer.write(_ckpt(1.0), tmp_path / "last.pt")
    writer.wait()
    (tmp_path / "blocked").mkdir()  # a folder where a file should go: the rename fails
    writer.write(_ckpt(2.0), tmp_path / "blocked")
    with pytest.raises(CheckpointError, match="blocked"):
        writer.wait()
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.ones(3))
    writer.write(_ckpt(3.0), tmp_path / "last.pt")  # the writer goes on after a reported failure
    writer.close()
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.full((3,), 3.0))
    assert sorted(os.listdir(tmp_path)) == ["blocked", "last.pt"]


def test_a_slow_disk_holds_the_writer_back_instead_of_queueing_copies(tmp_path, monkeypatch):
    """At most one write waits behind the one in progress: the third write() blocks until the
    first has landed."""
    import threading

    import trainer.checkpoint as checkpoint

    gate, started = threading.Event(), threading.Event()
    real_save = checkpoint.save_checkpoint

    def slow(ckpt, path):
        started.set()
        gate.wait(10)
        return real_save(ckpt, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow)
    writer = checkpoint.CheckpointWriter()
    writer.write(_ckpt(1.0), tmp_path / "a.pt")
    writer.write(_ckpt(2.0), tmp_path / "b.pt")
    started.wait(10)
    third = threading.Thread(target=writer.write, args=(_ckpt(3.0), tmp_path / "c.pt"))
    third.start()
    third.join(0.3)
    assert third.is_alive() and not (tmp_path / "a.pt").exists()  # blocked behind the slow write
    gate.set()
    third.join(10)
    writer.close()
    assert [load_checkpoint(tmp_path / f"{n}.pt")["model"]["w"][0].item() for n in "abc"] == [1.0, 2.0, 3.0]


def test_a_built_checkpoint_owns_its_tensors(tmp_path):
    """build_checkpoint copies every tensor, the optimizer's state included: training that goes on
    while the writer serialises cannot change what it writes."""
    from trainer.state import TrainState, build_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ckpt = build_checkpoint(ema_model=model, raw_model=model, ema_updates=1, optimizer=optimizer, scaler=None,
                            state=TrainState(maps=torch.zeros(2).numpy()), hyp={}, opt={}, spec={}, names=["a", "b"])
    before = {k: v.clone() for k, v in ckpt["optimizer"]["state"][0].items()}
    weight = ckpt["model"]["weight"].clone()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # in place, as the next epoch does
    assert not torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], before["momentum_buffer"])
    assert torch.equal(ckpt["optimizer"]["state"][0]["momentum_buffer"], before["momentum_buffer"])
    assert torch.equal(ckpt["model"]["weight"], weight) and not torch.equal(model.weight.detach(), weight)


def _same(a, b):
    """Equal trees: the same containers and keys, tensors equal in dtype, shape and value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_packed_trees_come_back_exactly():
    """Every dtype, rank and container; empty, scalar and non-contiguous tensors; None and int keys."""
    from trainer.checkpoint import pack_tensors, unpack_tensors

    g = torch.Generator().manual_seed(0)
    tree = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(4, 3, generator=g)},
                      5: {"momentum_buffer": None, "flag": torch.tensor([True, False])}},
            "param_groups": [{"lr": 0.01, "params": [0, 5], "betas": (0.9, 0.999)}],
            "half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
            "count": torch.tensor(3, dtype=torch.int64), "empty": torch.zeros(0, 5),
            "strided": torch.arange(12.0).view(3, 4).t(), "tuple": (torch.ones(1), "x", None)}
    packed = pack_tensors(tree)
    assert len(packed["data"]) == 4  # float32, bool, bfloat16, int64: one flat tensor each
    back = unpack_tensors(packed)
    assert _same(tree, back)
    assert back["strided"].is_contiguous()
    assert _same(unpack_tensors(pack_tensors({})), {}) and _same(unpack_tensors(pack_tensors(torch.ones(2))), torch.ones(2))


def test_resume_state_is_packed_on_disk_and_plain_when_loaded(tmp_path):
    """raw_model and optimizer travel packed, the EMA `model` stays a plain state dict for torch.load
    users, and load_checkpoint hands back what build_checkpoint made."""
    from trainer.state import TrainState, build_checkpoint

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    ckpt = build_checkpoint(ema_model=model, raw_model=model, ema_updates=3, optimizer=optimizer, scaler=None,
                            state=TrainState(maps=torch.zeros(2).numpy()), hyp={}, opt={}, spec={"name": "x"},
                            names=["a", "b"])
    path = save_checkpoint(ckpt, tmp_path / "last.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["raw_model"]["format"] == raw["optimizer"]["format"] == "kfyolo-packed-tensors-v1"
    assert set(raw["model"]) == set(model.state_dict()) and torch.is_tensor(raw["model"]["0.weight"])
    loaded = load_checkpoint(path)
    for key in ("model", "raw_model", "optimizer"):
        assert _same(ckpt[key], loaded[key]), key
    fresh = torch.optim.AdamW(model.parameters(), lr=0.01)
    fresh.load_state_dict(loaded["optimizer"])  # restores as the trainer does
    assert _same(fresh.state_dict(), optimizer.state_dict())


def test_unpacked_checkpoints_of_earlier_versions_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({**_ckpt(), "raw_model": {"w": torch.ones(3)}, "optimizer": {"state": {}, "param_groups": []}}, path)
    ck = load_checkpoint(path)
    assert torch.equal(ck["raw_model"]["w"], torch.ones(3)) and ck["optimizer"] == {"state": {}, "param_groups": []}


def test_a_packed_index_that_does_not_add_up_names_the_file(tmp_path):
    from trainer.checkpoint import pack_tensors

    bad = {**_ckpt(), "raw_model": pack_tensors({"w": torch.ones(3), "b": torch.ones(2)})}
    bad["raw_model"]["shape"] = torch.tensor([3, 3])  # 6 values claimed, 5 stored
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad.pt: raw_model: packed tensors do not match their index"):
        load_checkpoint(tmp_path / "bad.pt")
