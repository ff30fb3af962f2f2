"""Checkpoints: plain dicts of tensors and primitives, written atomically, loaded with weights_only.

A checkpoint holds the EMA model (what `best.pt` users want), the raw model, optimizer and scaler
state, the run's hyp/opt, model spec and class names, epoch, best fitness, maps and RNG states.

On disk, the resume-only parts (`raw_model`, `optimizer`) are packed: their tensors travel as one
flat tensor per dtype plus an index (pack_tensors), since torch.save pays about 50 us of Python per
tensor and yolov5n's optimizer and raw weights hold some 900 of them. load_checkpoint unpacks them,
so callers see the plain state dicts build_checkpoint made. `model`, the EMA weights, stays a plain
state dict in the file for anyone reading it with torch.load alone.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not a kfyolo checkpoint."""


REQUIRED_KEYS = ("model", "spec", "names")
PACKED_FORMAT = "kfyolo-packed-tensors-v1"
PACKED_KEYS = ("raw_model", "optimizer")  # resume-only state, packed on disk


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves either the
    old file or the new one, never half of one. The resume-only parts are packed (see the module)."""
    on_disk = dict(ckpt)
    for key in PACKED_KEYS:
        if on_disk.get(key) is not None:
            on_disk[key] = pack_tensors(on_disk[key])
    return _atomic_write(path, lambda f: torch.save(on_disk, f))


Place = tuple  # a place in a tree of dicts, lists and tuples: the keys and indices from its root


def pack_tensors(tree: Any) -> dict[str, Any]:
    """`tree` (dicts, lists, tuples, tensors and primitives) as a record that torch.save writes with a
    handful of tensors: the tree with each tensor replaced by None, each tensor's place in it, and
    the tensors' values concatenated per dtype, with their group, rank and shape as int64 tensors.
    Tensors come back as contiguous CPU tensors (views of their group's flat tensor)."""
    places: list[Place] = []
    tensors: list[torch.Tensor] = []
    skeleton = _without_tensors(tree, (), places, tensors)
    members: dict[torch.dtype, list[torch.Tensor]] = {}  # in order of first appearance: the groups
    for t in tensors:
        members.setdefault(t.dtype, []).append(t.detach().reshape(-1).cpu())
    group = {dtype: g for g, dtype in enumerate(members)}
    return {"format": PACKED_FORMAT, "tree": skeleton, "places": places,
            "group": torch.tensor([group[t.dtype] for t in tensors], dtype=torch.int64),
            "ndim": torch.tensor([t.dim() for t in tensors], dtype=torch.int64),
            "shape": torch.tensor([d for t in tensors for d in t.shape], dtype=torch.int64),
            "data": [torch.cat(flat) for flat in members.values()]}


def _without_tensors(node: Any, place: Place, places: list[Place], tensors: list[torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        places.append(place)
        tensors.append(node)
        return None
    if isinstance(node, dict):
        return {k: _without_tensors(v, place + (k,), places, tensors) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_without_tensors(v, place + (i,), places, tensors) for i, v in enumerate(node))
    return node


def is_packed(value: Any) -> bool:
    return isinstance(value, dict) and value.get("format") == PACKED_FORMAT


def unpack_tensors(record: dict[str, Any]) -> Any:
    """The tree pack_tensors packed. A record whose index does not add up raises CheckpointError."""
    try:
        group, ndim, dims = (record[k].tolist() for k in ("group", "ndim", "shape"))
        places, data = list(record["places"]), list(record["data"])
        if not (len(group) == len(ndim) == len(places) and sum(ndim) == len(dims)):
            raise ValueError("index lengths differ")
        shapes, at = [], 0
        for n in ndim:
            shapes.append(dims[at:at + n])
            at += n
        sizes: list[list[int]] = [[] for _ in data]
        for g, shape in zip(group, shapes):
            sizes[g].append(math.prod(shape))
        pieces = [iter(torch.split(flat, s)) if s else iter(()) for flat, s in zip(data, sizes)]
        by_place = {tuple(p): next(pieces[g]).view(shape) for p, g, shape in zip(places, group, shapes)}
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, StopIteration) as e:
        raise CheckpointError(f"packed tensors do not match their index ({type(e).__name__}: {e})") from None
    return _with_tensors(record["tree"], (), by_place)


def _with_tensors(node: Any, place: Place, by_place: dict[Place, torch.Tensor]) -> Any:
    if place in by_place:
        return by_place[place]
    if isinstance(node, dict):
        return {k: _with_tensors(v, place + (k,), by_place) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_with_tensors(v, place + (i,), by_place) for i, v in enumerate(node))
    return node


def _atomic_write(path: str | Path, fill: Callable[[BinaryIO], Any]) -> Path:
    """`fill` writes the file's bytes into a temporary file beside `path`; fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
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


def link_checkpoint(source: str | Path, path: str | Path) -> Path:
    """Give `path` the file `source` holds, atomically: a hard link (no bytes copied) renamed over
    `path`, or a copy written as save_checkpoint writes where the file system has no hard links.
    The two names may share a file because every checkpoint write here replaces its file by rename,
    never in place."""
    source, path = Path(source), Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.link"
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise CheckpointError(write_failure(path, e)) from None
        with source.open("rb") as src:
            _atomic_write(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
    return path


def _write(ckpt: dict[str, Any], path: Path, links: Sequence[Path]) -> None:
    save_checkpoint(ckpt, path)
    for other in links:
        link_checkpoint(path, other)


class CheckpointWriter:
    """Writes checkpoints on one background thread, in the order given, so that the next epoch
    trains while this one's checkpoint serialises (yolov5n's 29 MB last.pt takes 50-90 ms on these
    CPUs, the large models seconds). Each file is still written by save_checkpoint: temporary file,
    fsync, rename. The caller hands the dict over: its tensors must be its own copies
    (trainer.state.build_checkpoint makes them), since training goes on changing the live ones.

    A failed write is raised by the next write(), wait() or close() as the CheckpointError it was;
    the file it would have replaced is intact. At most one write waits behind the one in progress,
    so a slow disk holds training back instead of piling up copies of the state.
    `background=False` writes in the caller's thread."""

    def __init__(self, background: bool = True):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoints") if background else None
        self._pending: list[Future] = []

    def write(self, ckpt: dict[str, Any], path: str | Path, links: Sequence[str | Path] = ()) -> None:
        """Queue `ckpt` for `path`; once written, each of `links` gets the same file (best.pt)."""
        self._settle(keep=1)
        job = (ckpt, Path(path), [Path(p) for p in links])
        if self._pool is None:
            _write(*job)
        else:
            self._pending.append(self._pool.submit(_write, *job))

    def wait(self) -> None:
        """Return when every queued checkpoint is on disk; raise the first failure."""
        self._settle(keep=0)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _settle(self, keep: int) -> None:
        """Collect finished writes (raising the first failure) and wait until at most `keep` are left."""
        error = None
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
            future = self._pending.pop(0)
            try:
                future.result()
            except BaseException as e:  # later writes still run: the files they write are whole
                error = error or e
        if error is not None:
            raise error


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
    for key in PACKED_KEYS:
        if is_packed(ckpt.get(key)):
            try:
                ckpt[key] = unpack_tensors(ckpt[key])
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {key}: {e}") from None
    return ckpt
