"""Checkpoints: plain dicts of tensors and primitives, written atomically, loaded with weights_only.

A checkpoint holds the EMA model (what `best.pt` users want), the raw model, optimizer and scaler
state, the run's hyp/opt, model spec and class names, epoch, best fitness, maps and RNG states.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not a kfyolo checkpoint."""


REQUIRED_KEYS = ("model", "spec", "names")


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves either the
    old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary readable files
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch reports a full disk as a RuntimeError
            raise CheckpointError(write_failure(path, e)) from None
        raise
    return path


def write_failure(path: Path, e: BaseException) -> str:
    """One line for a failed write: the path, and the cause torch buries in its chained errors."""
    chain, seen = [], e
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left on device" in str(err):
            try:
                free = f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MB free)"
            except OSError:
                free = ""
            return f"cannot write {path}: no space left on device{free}; any previous {path.name} is intact"
    oserr = next((err for err in chain if isinstance(err, OSError)), None)
    cause = oserr.strerror if oserr is not None and oserr.strerror else (str(e).strip().splitlines() or [""])[0][:200]
    return f"cannot write {path}: {cause}; any previous {path.name} is intact"


def refused_global(e: BaseException) -> str:
    """The global a weights_only load refused, from torch's long message, in a few words."""
    m = re.search(r"GLOBAL ([\w.]+)|global '([\w.]+)'", str(e))
    return (f"it references {m.group(1) or m.group(2)}, which would run on load" if m
            else "it holds pickled objects that would run code")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a kfyolo checkpoint with `weights_only=True` (no pickled code can run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: code would have run
        raise CheckpointError(f"{path}: refused, {refused_global(e)}; kfyolo never executes code from a "
                              "checkpoint. An ultralytics .pt can be imported with --weights") from None
    except Exception as e:  # torch raises several types for truncated/foreign files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a kfyolo checkpoint (needs keys {list(REQUIRED_KEYS)})")
    return ckpt
