"""The warm process server (components/warm.py): jobs run in forks of one server that has imported
torch, with the step's environment, directory and stdio; failures come back as errors; a step that
goes away takes its job with it; without a server the work runs in the step's process."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from components import warm

PRELOAD = ("torch", "trainer.train", "components.launchers.local", "tests.warm_targets")


@pytest.fixture(scope="module")
def server():
    with warm.serving(PRELOAD) as path:
        assert os.environ[warm.ENV] == path
        yield path
    assert warm.ENV not in os.environ and not os.path.exists(path)


def test_a_job_runs_in_a_fork_of_the_server_with_the_steps_env_cwd_and_stdio(server, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KFYOLO_TEST_VALUE", "v1")
    first = warm.call("tests.warm_targets:where", {"name": "KFYOLO_TEST_VALUE"})
    monkeypatch.setenv("KFYOLO_TEST_VALUE", "v2")
    second = warm.call("tests.warm_targets:where", {"name": "KFYOLO_TEST_VALUE"})
    assert (first["value"], second["value"]) == ("v1", "v2")  # each job sees the step's environment of the moment
    assert first["cwd"] == str(tmp_path)
    assert first["torch_loaded"]  # preloaded: the job did not import it
    assert first["pid"] != os.getpid() and first["pid"] != second["pid"]
    assert first["pgid"] == first["pid"]  # its own process group, stopped as a whole
    out, err = capfd.readouterr()
    assert out.count("job stdout KFYOLO_TEST_VALUE") == 2 and err.count("job stderr KFYOLO_TEST_VALUE") == 2


def test_failures_come_back_as_errors(server, capfd):
    with pytest.raises(warm.WarmJobError, match="^ValueError: bad thing happened$"):
        warm.call("tests.warm_targets:fail", {"message": "bad thing happened"})
    assert "Traceback" in capfd.readouterr().err  # the job's traceback is in the step's log
    with pytest.raises(warm.WarmJobError, match="ended with exit status 3"):
        warm.call("tests.warm_targets:exit_with", {"code": 3})
    with pytest.raises(warm.WarmJobError, match="ended with signal 9"):
        warm.call("tests.warm_targets:die", {})
    with pytest.raises(warm.WarmJobError, match="ModuleNotFoundError: No module named 'tests.nothing_here'"):
        warm.call("tests.nothing_here:f", {})
    with pytest.raises(warm.WarmJobError, match="exit status 1"):
        warm.call("tests.warm_targets:unanswerable", {})  # not JSON: said, not lost
    assert "cannot send its result" in capfd.readouterr().err
    assert warm.call("tests.warm_targets:exit_with", {"code": 0}) is None


def test_a_step_that_goes_away_stops_its_job(server, tmp_path):
    marker = tmp_path / "pid"
    job = warm.submit("tests.warm_targets:wait_for_term", {"marker": str(marker)})
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(marker.read_text())
    job.sock.shutdown(socket.SHUT_RDWR)  # what the step's death does to the connection
    job.sock.close()
    while not Path(str(marker) + ".term").exists():
        assert time.monotonic() < deadline, "the job never got SIGTERM"
        time.sleep(0.05)
    while _alive(pid):
        assert time.monotonic() < deadline, "the job outlived its step"
        time.sleep(0.05)


def test_later_modules_load_while_the_server_is_idle():
    with warm.serving(("tests.warm_targets",), later=("colorsys", "no_such_module_here")):
        deadline = time.monotonic() + 30
        while not warm.call("tests.warm_targets:loaded", {"names": ["colorsys"]})[0]:
            assert time.monotonic() < deadline, "the later module never loaded"
            time.sleep(0.1)
        assert warm.call("tests.warm_targets:loaded", {"names": ["no_such_module_here"]}) == [False]


def test_without_a_server_the_work_runs_here(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(warm.ENV, raising=False)
    assert not warm.available()
    assert warm.call("tests.warm_targets:where", {"name": "HOME"})["pid"] == os.getpid()
    with pytest.raises(ValueError, match="raised here"):  # the exception itself, not a WarmJobError
        warm.call("tests.warm_targets:fail", {"message": "raised here"})
    # A server named but gone: said on stderr, and the work still runs here.
    monkeypatch.setenv(warm.ENV, str(tmp_path / "gone.sock"))
    with pytest.raises(warm.WarmUnavailable, match="gone.sock"):
        warm.submit("tests.warm_targets:where", {"name": "HOME"})
    assert warm.call("tests.warm_targets:where", {"name": "HOME"})["pid"] == os.getpid()
    assert "gone.sock" in capsys.readouterr().err


def test_a_server_that_cannot_start_leaves_the_steps_cold(monkeypatch, capsys):
    monkeypatch.delenv(warm.ENV, raising=False)
    monkeypatch.setattr(warm.sys, "executable", "/bin/false")  # the server process exits at once
    with warm.serving(PRELOAD):
        assert not warm.available()
        assert warm.call("tests.warm_targets:where", {"name": "HOME"})["pid"] == os.getpid()
    assert "the warm server did not start" in capsys.readouterr().err


def test_a_warm_block_trains_exactly_as_torchrun_does(server, synthetic_yaml, tmp_path, monkeypatch):
    """The same 2-rank block through torchrun and through the warm agent: the same weights."""
    import torch

    from components.launchers import TrainRequest
    from components.launchers.local import run_local
    from trainer.checkpoint import load_checkpoint

    def block(name: str) -> dict:
        request = TrainRequest(run_dir=tmp_path / name / "block", data_yaml=str(synthetic_yaml), block=0, blocks=1,
                               epochs_per_block=2, imgsz=64, batch_size=8, world_size=2, seed=0)
        run_local(request, echo=False)
        log = (request.run_dir / "train_block0.log").read_text()
        assert "rank 1/2 joined gloo" in log or "rank 0/2 joined gloo" in log
        return load_checkpoint(request.run_dir / "weights" / "last.pt"), log

    warm_ck, warm_log = block("warm")
    assert warm_log.startswith("$ (warm job ")
    with monkeypatch.context() as m:
        m.delenv(warm.ENV)
        cold_ck, cold_log = block("cold")
    assert "trainer.torchrun --standalone --nproc_per_node 2" in cold_log.splitlines()[0]
    assert warm_ck["epoch"] == cold_ck["epoch"] == 1
    for key, value in cold_ck["model"].items():
        assert torch.equal(warm_ck["model"][key], value), key


def test_a_block_whose_port_is_taken_starts_its_ranks_on_the_next_one(server):
    """The static rendezvous binds the agent's store to a port chosen just before: taken in
    between, the launch fails before any rank starts and the next free port is used."""
    out = warm.call("tests.warm_targets:ranks_on_a_taken_port", {})
    assert out["code"] == 0
    assert out["picked"][0] == out["taken"] and len(out["picked"]) == 2
    port = str(out["picked"][1])
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"], r["MASTER_PORT"], r["argv"]) for r in out["ranks"]] == [
        ("0", "0", "2", port, ["--x"]), ("1", "1", "2", port, ["--x"])]


def test_a_failing_warm_block_fails_with_the_trainers_error(server, synthetic_yaml, tmp_path):
    from components.launchers import TrainLaunchError, TrainRequest
    from components.launchers.local import run_local

    request = TrainRequest(run_dir=tmp_path / "block", data_yaml=str(synthetic_yaml), block=0, blocks=1,
                           epochs_per_block=1, imgsz=64, batch_size=8, world_size=2, hyp_overrides=("lr0=-1",))
    with pytest.raises(TrainLaunchError, match=r"failed \(exit status 1\): error: --hyp-override lr0=-1: hyp 'lr0' must be > 0"):
        run_local(request, echo=False)
    log = (request.run_dir / "train_block0.log").read_text()
    assert "train_rank FAILED" in log and "Root Cause" in log  # the elastic agent's own report


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"
