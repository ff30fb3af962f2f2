"""The local launcher: `torchrun --standalone --nproc_per_node N -m trainer.train ...` here, or, when
run-local's warm server is up (components/warm.py), the same launch by torch's elastic agent in a
process forked from that server, whose ranks are forked too and so start with torch imported."""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import IO, Callable

from components import warm
from components.launchers import TrainLaunchError, TrainRequest

LOG_TAIL_LINES = 40


def torchrun_command(request: TrainRequest) -> list[str]:
    """The command line: torchrun without relying on PATH, through trainer.torchrun, which is
    torch.distributed.run's main minus the agent's interpreter teardown (0.8 s a block)."""
    return [sys.executable, "-m", "trainer.torchrun", "--standalone", "--nproc_per_node",
            str(request.world_size), "-m", "trainer.train", *request.trainer_args()]


PORT_TRIES = 5


def train_ranks(nproc: int, trainer_args: list[str]) -> int:
    """What `torchrun --nnodes 1 --nproc_per_node nproc --master-port PORT -m trainer.train ARGS`
    does, run by the same agent (torch.distributed.launcher's elastic_launch: static rendezvous, as
    torchrun has it for one node, on a free local port; RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* per rank,
    no restarts, every rank stopped when one fails), with the ranks forked from this process instead
    of started as new interpreters. The static rendezvous starts the ranks in about 15 ms, where
    `--standalone`'s c10d one takes 120-190 ms (nothing here is elastic). A port taken between
    choosing and binding it fails before any rank starts, and the next free port is tried. The exit
    status: 0, or 1 after the agent's failure report."""
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun; the trainer sets its threads itself
    attempt = 0
    while True:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                              rdzv_backend="static", rdzv_endpoint=f"localhost:{free_port()}",
                              rdzv_configs={"rank": 0}, max_restarts=0, monitor_interval=0.02, start_method="fork")
        try:
            elastic_launch(config, train_rank)(list(trainer_args))
        except ChildFailedError as e:
            print(e.format_msg(), file=sys.stderr, flush=True)
            return 1
        except dist.DistNetworkError as e:  # the agent's store could not listen: no rank has started
            attempt += 1
            if "EADDRINUSE" in str(e) and attempt < PORT_TRIES:
                continue
            raise
        return 0


def free_port() -> int:
    """A local TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_rank(argv: list[str]) -> None:
    """One rank: the trainer CLI's main, with its allocator setting; a failure must fail the process
    so the agent sees it."""
    from trainer.memory import keep_freed_memory
    from trainer.train import main

    keep_freed_memory()
    code = main(argv)
    if code:
        raise SystemExit(code)


def _start(request: TrainRequest, env: dict[str, str], log: IO[str]) -> tuple[IO[str], Callable[[], int]]:
    """Start the block: its merged stdout and stderr, and how to wait for its exit status."""
    args = request.trainer_args()
    if warm.available():
        read, write = os.pipe()
        try:
            job = warm.submit("components.launchers.local:train_ranks",
                              {"nproc": request.world_size, "trainer_args": args}, output=write, env=env)
        except warm.WarmUnavailable as e:
            os.close(read)
            print(f"[kfyolo] {e}; starting torchrun", flush=True)
        else:
            log.write(f"$ (warm job {job.pid}: torchrun --standalone --nproc_per_node {request.world_size} "
                      f"-m trainer.train, ranks forked) {' '.join(args)}\n")
            return os.fdopen(read, "r"), job.result
        finally:
            os.close(write)
    cmd = torchrun_command(request)
    log.write("$ " + " ".join(cmd) + "\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    return proc.stdout, proc.wait


def run_local(request: TrainRequest, log_path: Path | None = None, echo: bool = True) -> None:
    """Run the block and wait. Output goes to `log_path` (default run_dir/train_block{k}.log) and,
    with `echo`, to this process's stdout (the KFP step log). A non-zero exit raises
    TrainLaunchError with the exit status and the end of the log."""
    log_path = log_path or request.run_dir / f"train_block{request.block}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONUNBUFFERED"] = "1"
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    errors: list[str] = []  # the trainer's own "error: ..." lines say what went wrong
    with log_path.open("w") as log:
        output, wait = _start(request, env, log)
        with output:
            for line in output:
                log.write(line)
                tail.append(line.rstrip("\n"))
                if line.startswith("error: "):
                    errors.append(line.strip())
                if echo:
                    print(line, end="", flush=True)
        try:
            code = wait()
        except warm.WarmJobError as e:  # the warm job itself died (its traceback is in the log)
            code = 1
            errors.append(f"error: {e}")
    if code != 0:
        joined = "\n".join(tail)
        reason = f": {errors[-1]}" if errors else ""
        raise TrainLaunchError(f"training block {request.block} failed (exit status {code}){reason}\n"
                               f"full log in {log_path}; last lines:\n{joined}")
