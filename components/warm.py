"""Warm processes for local pipeline runs: one server that has imported torch, torchvision, the
trainer and the steps' modules, and forks a fresh process for each job a step hands it.

Why: kfp.local runs every step as a new Python process, and each step's work (torchrun's agent,
each rank, an evaluation, the export) imports torch and torchvision again: about 4 s a process on
2 cores, over a minute of a 3-block demo's 8 minutes. `run-local` starts the server before the
pipeline (`serving`), so the imports happen once, while the first steps run, and a block's ranks
start with everything loaded. On a cluster every step is its own pod, and none of this applies.

    with serving():                         # run-local: sets KFYOLO_WARM for the step processes
        ...
    result = call("pkg.module:function", {"arg": 1})        # a step: runs warm, or here without a server
    job = submit("pkg.module:function", {...}, output=fd)   # the same, streaming into `fd`
    job.result()

A job is `module.function(**kwargs)`: JSON in, JSON out, run in a process forked from the server,
with the step's environment, working directory, stdout and stderr (their file descriptors travel
over the socket). It runs in its own process group; if the step goes away, the job gets SIGTERM
(the trainer's graceful stop), then SIGKILL after `KILL_GRACE_S`. An exception in the job prints
its traceback into the step's log and is raised in the step as WarmJobError with the same message.

Forking a process that has imported numpy and OpenCV (whose BLAS pools hold a thread each) is what
every DataLoader worker already does; the server itself runs no torch op, so no OpenMP pool exists
to be broken by the fork.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

ENV = "KFYOLO_WARM"
KILL_GRACE_S = 30.0
# What the jobs use. PRELOAD is imported before the first job starts: a training block needs all of
# it, and waiting for the server costs no more than importing in the job (a block's rank 0 imports
# torch.utils.tensorboard, and the dataset scan's np.median numpy.ma, on the path every rank waits
# on). LATER (evaluation, export, report) is imported once the first job has started, one module at
# a time while no other job is waiting, so the first block never waits for it; a job forked before
# then imports what it needs. A module that fails to import is just not preloaded (the job imports
# it, or fails, itself).
PRELOAD = ("torch", "torchvision", "torch.distributed.launcher.api", "trainer.train", "components.launchers.local",
           "torch.utils.tensorboard", "numpy.ma")
LATER = ("matplotlib.pyplot", "trainer.plots", "trainer.evaluate", "components.work", "trainer.report",
         "trainer.predict", "trainer.export", "onnx", "onnxruntime")


class WarmUnavailable(RuntimeError):
    """No server took the job (none configured, gone, or it closed before starting the job)."""


class WarmJobError(RuntimeError):
    """The job raised or ended abnormally; the message is the job's own (its traceback is in the log)."""


def available() -> bool:
    return bool(os.environ.get(ENV))


class Job:
    """A job the server has started; `result()` waits for its return value."""

    def __init__(self, sock: socket.socket, replies: Any, target: str, pid: int):
        self.sock, self.replies, self.target, self.pid = sock, replies, target, pid

    def result(self) -> Any:
        reply: dict[str, Any] = {}
        with self.sock, self.replies:
            # Up to the session's "exit" line, not EOF: a job's forked children may hold the socket.
            for line in self.replies:
                reply.update(json.loads(line))
                if "exit" in reply:
                    break
        code = reply.get("exit")
        if "error" in reply:
            raise WarmJobError(reply["error"])
        if code != 0 or "result" not in reply:
            how = f"exit status {code}" if code is None or code >= 0 else f"signal {-code}"
            raise WarmJobError(f"{self.target} (warm job {self.pid}) ended with {how}")
        return reply["result"]


def submit(target: str, kwargs: dict[str, Any], output: int | None = None,
           env: dict[str, str] | None = None) -> Job:
    """Start `target(**kwargs)` in the server named by $KFYOLO_WARM, writing stdout and stderr to
    `output` (default: this process's own). Raises WarmUnavailable if no job was started."""
    path = os.environ.get(ENV)
    if not path:
        raise WarmUnavailable(f"{ENV} is not set")
    request = json.dumps({"target": target, "kwargs": kwargs, "cwd": os.getcwd(),
                          "env": dict(os.environ if env is None else env)}).encode() + b"\n"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fds = [output, output] if output is not None else [1, 2]  # the step's own stdout and stderr
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        socket.send_fds(sock, [request], fds)
        replies = sock.makefile("r")
        started = replies.readline()  # the job says so before it runs anything
        pid = json.loads(started).get("started") if started else None
    except (OSError, ValueError, KeyError) as e:
        sock.close()
        raise WarmUnavailable(f"warm server {path}: {e}") from None
    if pid is None:
        sock.close()
        raise WarmUnavailable(f"warm server {path} did not start {target}: {started.strip() or 'no answer'}")
    return Job(sock, replies, target, pid)


def call(target: str, kwargs: dict[str, Any]) -> Any:
    """`target(**kwargs)`, in a warm fork when run-local's server is up, else in this process."""
    try:
        job = submit(target, kwargs)
    except WarmUnavailable as e:
        if available():
            print(f"[kfyolo] {e}; running {target} in this process", file=sys.stderr, flush=True)
        return resolve(target)(**kwargs)
    return job.result()


def resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# ---- the server ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(preload: tuple[str, ...] = PRELOAD, later: tuple[str, ...] = LATER) -> Iterator[str]:
    """Run a server for the duration and point $KFYOLO_WARM at it (the step processes inherit it).
    The socket is listening when this yields; jobs queue until the server has finished its imports."""
    folder = tempfile.mkdtemp(prefix="kfyolo-warm-")  # 0700, and short: a socket path is at most 107 bytes
    path = os.path.join(folder, "server.sock")
    ready = os.path.join(folder, "listening")
    proc = subprocess.Popen([sys.executable, "-m", "components.warm", path, ",".join(preload), ",".join(later)],
                            stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    previous = os.environ.get(ENV)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if os.path.exists(ready):
            os.environ[ENV] = path
        else:
            print("[kfyolo] the warm server did not start; each step imports torch itself", file=sys.stderr)
        yield path
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for name in (path, ready):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        os.rmdir(folder)


def serve(path: str, preload: tuple[str, ...], later: tuple[str, ...] = ()) -> None:
    """Listen on `path`, import `preload`, then fork a session per connection, importing `later`
    (after the first) one module at a time while none is waiting, until SIGTERM or until the parent
    that started the server is gone."""
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    Path(path).with_name("listening").touch()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is run-local's to handle: it stops the server
    for name in preload:
        _preload(name)
    _first_load()
    pending: list[str] = []
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    while os.getppid() == parent:
        waiting, _, _ = select.select([listener], [], [], 0 if pending else 1.0)
        if not waiting:
            if pending:
                _preload(pending.pop(0))
            continue
        conn, _ = listener.accept()
        pending, later = pending + list(later), ()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            _session(conn)
        conn.close()


def _preload(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - an optional module missing here is the job's business
        print(f"[kfyolo] warm server: not preloading {name}: {e}", file=sys.stderr)
    # What is loaded so far leaves the collector's generations: the jobs' collections then never
    # walk (and so never copy-on-write) the modules they inherit.
    gc.freeze()


def _first_load() -> None:
    """A weights_only torch.load of a tiny checkpoint: the first load in a process costs about 40 ms
    more than later ones (measured on a 29 MB last.pt: 0.14-0.15 s against 0.10 s), and every rank,
    evaluation and export that forks from here starts past it. No tensor maths: nothing starts a
    thread pool before the forks."""
    if "torch" not in sys.modules:
        return
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}, "train_state": {"epoch": 0, "maps": [0.0]}, "names": ["a"]}, buffer)
    buffer.seek(0)
    torch.load(buffer, map_location="cpu", weights_only=True)
    gc.freeze()


def _session(conn: socket.socket) -> None:
    """One connection: start the job, tell the step, then wait for the job or for the step to go."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
        while not message.endswith(b"\n"):  # a long environment arrives in pieces
            more = conn.recv(1 << 16)
            if not more:
                raise ConnectionError("the step closed the connection mid-request")
            message += more
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            _job(conn, request, fds)
        with contextlib.suppress(OSError):  # the job does it too: whichever runs first, killpg finds the group
            os.setpgid(pid, pid)
        for fd in fds:
            os.close(fd)
        code = _wait(pid, conn)
        with contextlib.suppress(OSError):  # the step may be gone
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
    except Exception:  # noqa: BLE001 - the session must not fall back into the server's accept loop
        traceback.print_exc()
    finally:
        os._exit(0)


def _wait(pid: int, conn: socket.socket) -> int:
    """The job's exit code. If the step closes the connection first, the job's process group gets
    SIGTERM, then SIGKILL after KILL_GRACE_S."""
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(conn, select.POLLIN | select.POLLHUP)
    stopping = 0.0
    while pidfd not in dict(poller.poll(100 if stopping else None)):
        if not stopping and not conn.recv(1, socket.MSG_PEEK):  # readable, and nothing to read: gone
            poller.unregister(conn)
            stopping = time.monotonic()
            _signal_group(pid, signal.SIGTERM)
        elif stopping and time.monotonic() - stopping > KILL_GRACE_S:
            _signal_group(pid, signal.SIGKILL)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _job(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """The forked job: take the step's stdio, environment and directory, run, reply, exit."""
    import random

    os.setpgid(0, 0)
    conn.sendall(json.dumps({"started": os.getpid()}).encode() + b"\n")  # before anything can fail
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    random.seed()  # as a fresh interpreter would be; the trainer seeds what it uses
    reply: dict[str, Any]
    code = 0
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        reply = {"result": resolve(request["target"])(**request["kwargs"])}
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        reply = {} if code else {"result": None}
    except BaseException as e:  # noqa: BLE001 - reported to the step, which raises it
        traceback.print_exc()
        reply, code = {"error": f"{type(e).__name__}: {e}"}, 1
    try:
        conn.sendall(json.dumps(reply, default=float).encode() + b"\n")
    except (OSError, TypeError, ValueError) as e:
        print(f"[kfyolo] warm job {request['target']}: cannot send its result: {e}", file=sys.stderr)
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    serve(sys.argv[1], *(tuple(m for m in arg.split(",") if m) for arg in sys.argv[2:4]))
