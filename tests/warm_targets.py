"""Jobs for tests/test_warm.py: importable by the warm server as tests.warm_targets."""

from __future__ import annotations

import os
import signal
import sys
import time


def where(name: str) -> dict:
    """Which process ran the job, in which directory, with which environment and modules."""
    print(f"job stdout {name}")
    print(f"job stderr {name}", file=sys.stderr)
    return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "cwd": os.getcwd(),
            "value": os.environ.get(name), "torch_loaded": "torch" in sys.modules}


def fail(message: str) -> None:
    raise ValueError(message)


def exit_with(code: int) -> None:
    raise SystemExit(code)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def unanswerable() -> object:
    return object()


def wait_for_term(marker: str) -> None:
    """Write our pid, then sleep until SIGTERM, which writes `marker` + ".term"."""
    def on_term(*_):
        open(marker + ".term", "w").close()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)


def loaded(names: list[str]) -> list[bool]:
    return [name in sys.modules for name in names]


def _rank_env() -> dict:
    """What a rank of train_ranks sees (the target replaces the trainer in ranks_on_a_taken_port)."""
    return {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def ranks_on_a_taken_port() -> dict:
    """train_ranks when the first port it picks is taken before its agent binds it: the ranks'
    environment and ports, with the ranks replaced by a function that writes what they see."""
    import json
    import socket
    import tempfile

    from components.launchers import local

    held = socket.socket()
    held.bind(("localhost", 0))
    held.listen()
    taken = held.getsockname()[1]
    ports = iter([taken])
    picked: list[int] = []
    real_free_port = local.free_port

    def free_port() -> int:
        picked.append(next(ports, None) or real_free_port())
        return picked[-1]

    out = tempfile.mkdtemp()

    def rank(argv: list[str]) -> None:
        with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump({**_rank_env(), "argv": argv}, f)

    local.free_port, local.train_rank = free_port, rank  # this forked job's own copy of the module
    try:
        code = local.train_ranks(2, ["--x"])
    finally:
        held.close()
    ranks = [json.load(open(os.path.join(out, name))) for name in sorted(os.listdir(out))]
    return {"code": code, "taken": taken, "picked": picked, "ranks": ranks}
