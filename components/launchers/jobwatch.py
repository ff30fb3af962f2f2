"""Watching a training job of any kind: poll its status until it ends, stream the master's log, and
adopt the job an earlier attempt of the same step created (see components/launchers/clusterjob.py)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from components.launchers import TrainLaunchError
from components.launchers.cluster import SPEC_HASH_ANNOTATION, Cluster, ClusterError, JobState, LogLine

LOG_TAIL_LINES = 40
DELETE_WAIT_S = 300  # how long a replaced job may take to disappear


@dataclass
class LogFollower:
    """Prints the master's log as it arrives; keeps its tail and the trainer's `error:` lines."""

    say: Callable[[str], None]
    since: str = ""
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES))
    errors: list[str] = field(default_factory=list)

    def feed(self, lines: Sequence[LogLine]) -> None:
        for line in lines:
            self.say(line.text)
            self.tail.append(line.text)
            if line.text.startswith("error: "):
                self.errors.append(line.text.strip())
            self.since = max(self.since, line.stamp)

    def summary(self) -> str:
        reason = f"\ntrainer: {self.errors[-1]}" if self.errors else ""
        tail = "\n".join(self.tail)
        return f"{reason}\nlast lines of the master's log:\n{tail}" if tail else reason


@dataclass(frozen=True)
class Clock:
    """Time as the watch loop sees it; tests pass a fake one."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def watch(cluster: Cluster, name: str, timeout_s: float, poll_s: float, follower: LogFollower,
          clock: Clock = Clock(), api_retries: int = 5, kind: str = "PyTorchJob") -> JobState:
    """Poll the job until it succeeds (returned) or fails, vanishes or outlasts `timeout_s`
    (TrainLaunchError). Transient API errors are retried `api_retries` times in a row."""
    where, say = f"{kind} {cluster.namespace}/{name}", follower.say
    deadline = clock.now() + timeout_s
    phase, restarts, failures = "", 0, 0
    while True:
        try:
            state = cluster.status(name)
            lines = cluster.logs(name, follower.since) if state is not None else []
            failures = 0
        except ClusterError as e:
            failures += 1
            if not e.transient or failures > api_retries:
                raise TrainLaunchError(f"lost track of {where}: {e}") from e
            say(f"[kfyolo] warning: {e}; asking again in {poll_s:g} s ({failures}/{api_retries})")
            clock.sleep(poll_s)
            continue
        if state is None:
            raise TrainLaunchError(f"{where} was deleted while the step waited for it (last state "
                                   f"{phase or 'unknown'}){follower.summary()}")
        if state.phase != phase:
            phase = state.phase
            say(f"[kfyolo] {where}: {phase}" + (f" ({state.reason()})" if state.reason() else ""))
        if state.restarts > restarts:
            restarts = state.restarts
            say(f"[kfyolo] {where}: its pods have restarted {restarts} time(s); the log continues with the new one")
        follower.feed(lines)
        if state.succeeded:
            return state
        if state.failed:
            raise TrainLaunchError(f"{where} failed: {state.reason() or 'no reason given'}{follower.summary()}")
        if clock.now() >= deadline:
            raise TrainLaunchError(f"{where} timed out: still {phase} after {timeout_s:g} s{follower.summary()}")
        clock.sleep(poll_s)


def adopt(cluster: Cluster, job: dict[str, Any], say: Callable[[str], None], clock: Clock, poll_s: float) -> bool:
    """True when a job of this name, made from this very spec, is running or done: watch it rather
    than create another. A failed one is deleted (False: create anew); a stranger's is an error."""
    name, want = job["metadata"]["name"], job["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    kind = job["kind"]
    state = cluster.status(name)
    if state is None:
        return False
    if state.spec_hash != want:
        raise TrainLaunchError(f"{kind} {cluster.namespace}/{name} exists but was not made from this block's "
                               f"spec (hash {state.spec_hash or 'none'}, expected {want}); delete it or start a "
                               "new run")
    if not state.failed:
        say(f"[kfyolo] adopting {kind} {name} ({state.phase}) created by an earlier attempt of this step")
        return True
    say(f"[kfyolo] {kind} {name} of an earlier attempt failed ({state.reason()}); replacing it")
    cluster.delete(name)
    deadline = clock.now() + DELETE_WAIT_S
    while cluster.status(name) is not None:
        if clock.now() >= deadline:
            raise TrainLaunchError(f"{kind} {cluster.namespace}/{name} still exists {DELETE_WAIT_S} s after "
                                   "deleting it")
        clock.sleep(poll_s)
    return False
