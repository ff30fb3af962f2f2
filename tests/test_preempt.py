"""Graceful stop (trainer/preempt.py): SIGTERM/SIGINT end training on an optimizer step with a
resumable checkpoint; --resume finishes the epoch on the same draw, bitwise; restarts resume by
themselves (--auto-resume, torchrun --max-restarts)."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_checkpoint
from trainer.data.epoch_sampler import EpochSampler
from trainer.fit import fit
from trainer.preempt import Preempted, StopRequest, exit_code
from trainer.train import build_parser, main, options_from_args

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4", "--device", "cpu", "--epochs", "3",
         "--seed", "5", "--deterministic", "--nbs", "8", "--image-weights"]


# ------------------------------------------------------------------ the sampler's skip

@pytest.mark.parametrize("whole_batches", [False, True])
@pytest.mark.parametrize("n", [23, 24])
def test_skip_leaves_out_the_trained_global_batches_at_any_world_size(n, whole_batches):
    """Skipping k global batches gives each rank the tail of its own list (same world size), and
    at another world size the ranks together cover exactly the positions not yet trained."""
    global_batch = 4
    full = {}
    for w in (1, 2, 4):
        for r in range(w):
            s = EpochSampler(n, global_batch // w, seed=1, rank=r, world_size=w, whole_batches=whole_batches)
            s.set_epoch(3)
            full[w, r] = s.positions()
    for k in range(0, 7):
        skip = k * global_batch
        for w in (1, 2, 4):
            rest = []
            for r in range(w):
                s = EpochSampler(n, global_batch // w, seed=1, rank=r, world_size=w, whole_batches=whole_batches)
                s.set_epoch(3, skip=skip)
                mine = s.positions()
                assert np.array_equal(mine, full[w, r][k * (global_batch // w):])  # its own tail
                assert len(s) == len(mine) and s.batches_per_epoch() == -(-len(full[w, r]) // (global_batch // w))
                rest.append(mine)
            trained = np.concatenate([full[1, 0][:skip]])
            left = set(np.concatenate(rest).tolist())
            assert left | set(trained.tolist()) == set(range(n))  # nothing lost
            if sum(len(full[w, r]) for r in range(w)) == n:  # no wrap-around padding: nothing trained twice
                assert not left & set(trained.tolist())


def test_skip_must_be_whole_global_batches():
    s = EpochSampler(10, 2, world_size=2, rank=0)
    with pytest.raises(ValueError, match="multiple of the global batch 4"):
        s.set_epoch(0, skip=2)
    s.set_epoch(0, skip=40)  # past the end: nothing left
    assert len(s) == 0 and list(s) == []


# ------------------------------------------------------------------ the signal and the decision

def test_a_real_sigterm_is_recorded_and_decides_the_stop(capfd):
    stop = StopRequest(grace_s=20)
    before = signal.getsignal(signal.SIGTERM)
    with stop:
        assert not stop.requested and stop.remaining() == 20
        assert not stop.poll(batches_to_step=3, batch_s=1.0).stop
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.name == "SIGTERM" and 19 < stop.remaining() <= 20
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwarding the same signal: not a second request
        time.sleep(0.05)
        d = stop.poll(batches_to_step=3, batch_s=1.0)  # 3 s of work fits in 20 s minus the reserve
        assert d.stop and not d.now
        d = stop.poll(batches_to_step=3, batch_s=5.0)  # 15 s does not: drop the partial accumulation
        assert d.stop and d.now
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert "SIGTERM received: finishing the current optimizer step" in capfd.readouterr().err
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130
    with pytest.raises(ValueError, match="--grace-period must be > 0"):
        StopRequest(grace_s=0)


def test_the_watchdog_ends_a_stop_that_overruns_the_grace_period(tmp_path):
    """A stop stuck past the grace period (a peer that never answers) exits with 128 + signal."""
    code = ("import os, signal, time\nfrom trainer.preempt import StopRequest\n"
            "with StopRequest(grace_s=1):\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 20
    assert "grace period of 1 s over" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ one process: bitwise resume

class StopAfter(StopRequest):
    """SIGTERM as if it arrived after the k-th micro-batch (deterministic, for the bitwise check)."""

    def __init__(self, k: int):
        super().__init__(grace_s=25)
        self.k, self.polls = k, 0

    def poll(self, batches_to_step, batch_s):
        self.polls += 1
        if self.polls == self.k:
            self.signum, self.received_at = signal.SIGTERM, time.monotonic()
        return super().poll(batches_to_step, batch_s)


def _results(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("train_s", "val_s")} for r in csv.DictReader((run / "results.csv").open())]


def _assert_same_run(a: Path, b: Path) -> dict:
    wa, wb = (load_checkpoint(p / "weights" / "last.pt") for p in (a, b))
    for part in ("model", "raw_model"):
        for k, v in wa[part].items():
            assert torch.equal(v, wb[part][k]), f"{part}.{k} differs"
    assert wa["train_state"]["last_opt_step"] == wb["train_state"]["last_opt_step"]  # no step lost or repeated
    assert _results(a) == _results(b)
    return wb


def test_stop_inside_an_epoch_then_resume_is_bitwise(tmp_path, synthetic_yaml):
    data = ["--data", str(synthetic_yaml), "--project", str(tmp_path), "--workers", "1", "--multi-scale"]
    assert main([*data, *FLAGS, "--name", "whole"]) == 0
    opt, _ = options_from_args(build_parser().parse_args([*data, *FLAGS, "--name", "cut"]))
    with pytest.raises(Preempted) as stopped:
        fit(opt, stop=StopAfter(8))  # after batch 2 of 6 of epoch 1
    assert stopped.value.exit_code == 143 and "resume with: python -m trainer.train --resume" in str(stopped.value)
    ckpt = load_checkpoint(tmp_path / "cut" / "weights" / "last.pt")
    state = ckpt["train_state"]
    assert state["epoch"] == 1 and state["images_done"] in (8, 12)  # on the step at batch 2 or the next one
    assert state["last_opt_step"] == 6 + state["images_done"] // 4 - 1
    assert len(state["draw"]) == 24 and len(_results(tmp_path / "cut")) == 1  # the epoch's draw is kept
    assert main(["--resume", str(tmp_path / "cut" / "weights" / "last.pt"), "--workers", "1"]) == 0
    final = _assert_same_run(tmp_path / "whole", tmp_path / "cut")
    assert final["train_state"]["images_done"] == 0 and final["train_state"]["draw"] is None


def test_a_signal_before_training_saves_nothing_and_says_so(tmp_path, synthetic_yaml):
    opt, _ = options_from_args(build_parser().parse_args(
        ["--data", str(synthetic_yaml), "--project", str(tmp_path), "--workers", "0", *FLAGS, "--name", "x"]))
    early = StopRequest()
    early.signum, early.received_at = signal.SIGINT, time.monotonic()
    with pytest.raises(Preempted, match="stopped by SIGINT before epoch 0: nothing trained yet") as e:
        fit(opt, stop=early)
    assert e.value.exit_code == 130 and not (tmp_path / "x" / "weights" / "last.pt").exists()


def test_auto_resume_starts_fresh_resumes_and_knows_when_it_is_done(tmp_path, synthetic_yaml, capfd):
    args = ["--data", str(synthetic_yaml), "--project", str(tmp_path), "--workers", "0", *FLAGS, "--name", "r",
            "--auto-resume"]
    assert main([*args, "--stop-epoch", "1"]) == 0  # nothing there yet: a fresh run, no --exist-ok needed
    assert main([*args, "--stop-epoch", "1"]) == 0  # a restart after the block ended: nothing to do
    assert "has already trained 1 epochs of 3; nothing left to do" in capfd.readouterr().err
    assert len(_results(tmp_path / "r")) == 1
    assert main(args) == 0  # resumes epoch 1 from the same folder instead of starting over
    assert [int(r["epoch"]) for r in _results(tmp_path / "r")] == [0, 1, 2]
    assert not (tmp_path / "r2").exists()
    other = [a if a != "5" else "6" for a in args]  # same folder, different seed: not this run
    assert main(other) == 2


def test_a_resume_redoes_the_rows_its_checkpoint_does_not_hold(tmp_path, synthetic_yaml):
    """Killed after an epoch's results.csv row and weighting record were written but before its
    checkpoint landed (the checkpoint writer works in the background): the resume drops that
    epoch's row and record and writes them again, once each."""
    import json

    args = ["--data", str(synthetic_yaml), "--project", str(tmp_path), "--workers", "0", *FLAGS, "--name", "k"]
    assert main([*args, "--stop-epoch", "1"]) == 0
    run = tmp_path / "k"
    with (run / "results.csv").open("a") as f:  # epoch 1 as a killed run leaves it: row, no checkpoint
        f.write("1" + (run / "results.csv").read_text().splitlines()[-1][1:] + "\n")
    record = json.loads((run / "image_weights.jsonl").read_text().splitlines()[-1])
    with (run / "image_weights.jsonl").open("a") as f:
        f.write(json.dumps({**record, "epoch": 1, "class_draws": [-1]}) + "\n")
    stale = _results(run)[1]
    assert main(["--resume", str(run / "weights" / "last.pt"), "--workers", "0"]) == 0
    rows = _results(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and rows[1]["total"] != stale["total"]
    records = [json.loads(line) for line in (run / "image_weights.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] and records[1]["class_draws"] != [-1]


# ------------------------------------------------------------------ torchrun, 2 gloo ranks

def _torchrun(args: list[str], *extra: str) -> subprocess.Popen:
    """torchrun with 2 local ranks and c10d rendezvous (what elastic jobs and restarts use: the
    static master_addr rendezvous could not re-form the gloo group after a restart here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen([str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", f"127.0.0.1:{port}", *extra, "-m", "trainer.train", *args], cwd=ROOT,
                            env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_rows(run: Path, rows: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "results.csv").exists() and len(_results(run)) >= rows:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"{run}: {rows} epochs not written in {timeout} s")


def _worker_pids(agent: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of torchrun's worker processes."""
    out = {}
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for item in env:
            if item.startswith(b"LOCAL_RANK="):
                out[int(item.split(b"=")[1])] = int(child)
    return out


def test_sigterm_under_torchrun_stops_cleanly_then_resume_loses_no_step(tmp_path, synthetic_yaml):
    data = ["--data", str(synthetic_yaml), "--project", str(tmp_path), "--workers", "0", "--grace-period", "20"]
    ref = _torchrun([*data, *FLAGS, "--name", "whole"])
    assert ref.wait(timeout=600) == 0, ref.communicate()[0][-3000:]
    proc = _torchrun([*data, *FLAGS, "--name", "cut"])
    _wait_rows(tmp_path / "cut", 2, proc)  # epoch 2 of 3 has begun
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # what the kubelet does to the pod's torchrun
    out = proc.communicate(timeout=60)[0]
    assert time.monotonic() - t0 < 20, out[-3000:]
    assert "stopped by SIGTERM" in out and "rank 1: stopped by SIGTERM" in out, out[-3000:]
    state = load_checkpoint(tmp_path / "cut" / "weights" / "last.pt")["train_state"]
    assert state["epoch"] == 2  # inside epoch 2 (images_done > 0) or just before it
    resumed = _torchrun(["--resume", str(tmp_path / "cut" / "weights" / "last.pt"), "--workers", "0"])
    assert resumed.wait(timeout=600) == 0, resumed.communicate()[0][-3000:]
    _assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_a_rank_killed_mid_run_under_max_restarts_completes(tmp_path, synthetic_yaml):
    args = ["--data", str(synthetic_yaml), "--project", str(tmp_path), "--workers", "0", *FLAGS, "--name", "k",
            "--auto-resume", "--dist-timeout", "60"]
    proc = _torchrun(args, "--max-restarts", "1")
    _wait_rows(tmp_path / "k", 1, proc)
    os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)  # rank 1 dies without a word
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "--auto-resume: resuming from" in out
    assert int(_results(tmp_path / "k")[-1]["epoch"]) == 2
    assert load_checkpoint(tmp_path / "k" / "weights" / "last.pt")["train_state"]["epoch"] == 3
