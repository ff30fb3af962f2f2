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
