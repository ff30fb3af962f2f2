"""A graceful stop on SIGTERM or SIGINT: finish the optimizer step, save, exit with a clear line.

A pod that is preempted, evicted or drained gets SIGTERM, then SIGKILL after its grace period
(30 s by default in Kubernetes). Under torchrun the agent forwards the signal to every worker. What
happens then, on every rank:

1. The handler only records the signal (and starts a watchdog, below). The loop polls it after each
   micro-batch; under DDP the ranks agree with one tiny all-reduce, so they all stop after the same
   batch whatever order the signal reached them in.
2. Training goes on to the end of the optimizer step being accumulated, unless the batches left
   before it would not fit in the grace period; then the partial accumulation is dropped and the
   stop lands on the previous step. Either way no finished optimizer step is lost.
3. Rank 0 writes weights/last.pt with the epoch's drawn image list and how many images of it were
   trained (and uploads the run folder when it lives on S3). `--resume` trains the rest of that
   epoch on the same list, at any world size with the same global batch.
4. Every rank exits with one line and code 128 + the signal number (143 for SIGTERM, 130 for
   SIGINT), the code a shell reports for death by that signal. A PyTorchJob with
   `restartPolicy: ExitCode` treats codes above 127 as retryable and restarts the pod, which then
   resumes by itself (`--auto-resume`).

The watchdog ends the process with the same code when the grace period runs out (a peer that never
answers a collective, a slow upload): a late checkpoint is worth less than a clean exit before
SIGKILL, and the checkpoint write is atomic, so an interrupted one leaves the previous last.pt. A
second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch

from trainer import distributed

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEFAULT_GRACE_S = 25.0  # under Kubernetes' default terminationGracePeriodSeconds of 30
DUPLICATE_S = 2.0  # a repeat of the signal within this is the same request
CHECKPOINT_RESERVE = 0.35  # share of the grace period kept for the checkpoint and its upload


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class Preempted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint (or on a rank that does not
    save). `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = exit_code(signum)


@dataclass(frozen=True)
class StopDecision:
    stop: bool = False
    now: bool = False  # drop the partial accumulation instead of finishing the step


class StopRequest:
    """Records SIGTERM / SIGINT while installed; `poll()` turns it into one decision for all ranks."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S):
        if grace_s <= 0:
            raise ValueError(f"--grace-period must be > 0 seconds, got {grace_s}")
        self.grace_s = grace_s
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None

    # -- installing
    def install(self) -> StopRequest:
        """Take over SIGTERM and SIGINT (only possible from the main thread; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - (self.received_at or 0) < DUPLICATE_S:
                return  # Ctrl-C reaches torchrun and its workers, and torchrun forwards it once more
            os.write(2, f"{name} again: exiting now without a checkpoint\n".encode())  # the user insists
            os._exit(exit_code(signum))
        self.signum, self.received_at = signum, time.monotonic()
        os.write(2, f"{name} received: finishing the current optimizer step, then saving a resumable "
                    f"checkpoint (grace period {self.grace_s:g} s)\n".encode())
        self._watchdog = threading.Timer(self.grace_s, self._expire, args=(signum,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self, signum: int) -> None:
        sys.stderr.write(f"grace period of {self.grace_s:g} s over before the stop finished: exiting with code "
                         f"{exit_code(signum)}; the previous checkpoint stands\n")
        sys.stderr.flush()
        os._exit(exit_code(signum))

    # -- asking
    @property
    def requested(self) -> bool:
        return self.signum is not None

    def remaining(self) -> float:
        """Seconds left of the grace period (the whole period when no signal came)."""
        if self.received_at is None:
            return self.grace_s
        return self.grace_s - (time.monotonic() - self.received_at)

    def poll(self, batches_to_step: int, batch_s: float) -> StopDecision:
        """After a micro-batch: stop? And if so, now, or after the `batches_to_step` left before the
        optimizer step (each about `batch_s` seconds)? The same answer on every rank."""
        short = self.requested and batches_to_step * batch_s > self.remaining() - CHECKPOINT_RESERVE * self.grace_s
        stop, now = self._any_rank(self.requested, short)
        return StopDecision(stop, stop and now)

    def agreed(self) -> bool:
        """Whether any rank has a stop request (a collective: call it at the same point on every rank)."""
        return self._any_rank(self.requested)[0]

    def _any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over the ranks. A rank that learns of a peer's request adopts it (as SIGTERM:
        under torchrun every rank gets the signal, so this only shortens the wait for a late one)."""
        agreed = tuple(bool(v) for v in distributed.all_reduce_max(torch.tensor([float(f) for f in flags])).tolist())
        if agreed[0] and self.signum is None:
            self.signum, self.received_at = signal.SIGTERM, time.monotonic()
        return agreed

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
