"""The local launcher: `torchrun --standalone --nproc_per_node N -m trainer.train ...` here."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

from components.launchers import TrainLaunchError, TrainRequest

LOG_TAIL_LINES = 40


def torchrun_command(request: TrainRequest) -> list[str]:
    """The command line: torchrun without relying on PATH, through trainer.torchrun, which is
    torch.distributed.run's main minus the agent's interpreter teardown (0.8 s a block)."""
    return [sys.executable, "-m", "trainer.torchrun", "--standalone", "--nproc_per_node",
            str(request.world_size), "-m", "trainer.train", *request.trainer_args()]


def run_local(request: TrainRequest, log_path: Path | None = None, echo: bool = True) -> None:
    """Run the block and wait. Output goes to `log_path` (default run_dir/train_block{k}.log) and,
    with `echo`, to this process's stdout (the KFP step log). A non-zero exit raises
    TrainLaunchError with the exit status and the end of the log."""
    log_path = log_path or request.run_dir / f"train_block{request.block}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(request)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONUNBUFFERED"] = "1"
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    errors: list[str] = []  # the trainer's own "error: ..." lines say what went wrong
    with log_path.open("w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, env=env, bufsize=1) as proc:
        log.write("$ " + " ".join(cmd) + "\n")
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip("\n"))
            if line.startswith("error: "):
                errors.append(line.strip())
            if echo:
                print(line, end="", flush=True)
        code = proc.wait()
    if code != 0:
        joined = "\n".join(tail)
        reason = f": {errors[-1]}" if errors else ""
        raise TrainLaunchError(f"training block {request.block} failed (exit status {code}){reason}\n"
                               f"full log in {log_path}; last lines:\n{joined}")
