"""Image/label discovery and validation for YOLO-format splits, with a JSON label cache.

Policy (every skipped file is counted in the `DatasetReport` and logged with its file and line):

- a missing, corrupt, truncated or tiny image, or ANY malformed label line, rejects the image:
  a partially labelled image would teach the model that the dropped objects are background;
- duplicate label rows are dropped and counted, the image is kept;
- an image with no label file (or an empty one) is a background image, kept and counted;
- a label file with no image beside it is an orphan, reported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from trainer.data.config import is_image_file

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MIN_IMAGE_SIDE = 10  # px; smaller images cannot hold a useful box at stride 8
COORD_TOL = 1e-6  # label exporters round; tolerate tiny excursions, then clip


class DatasetError(ValueError):
    """A split is unusable (no image survived validation) or an image vanished after scanning."""


@dataclass(frozen=True)
class LabelEntry:
    """One kept image: its path, original (h, w) and labels (n, 5) [cls, cx, cy, w, h] normalised."""

    img_path: Path
    shape_hw: tuple[int, int]
    labels: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one image and its label file (JSON-serialisable via to_json)."""

    shape_hw: tuple[int, int] | None
    labels: np.ndarray | None  # (n, 5) float32, None when rejected
    reason: str | None = None  # rejection reason, None when kept
    duplicate_lines: tuple[int, ...] = ()  # 1-based lines dropped as duplicates
    background: bool = False

    def to_json(self) -> dict:
        return {
            "shape_hw": list(self.shape_hw) if self.shape_hw else None,
            "labels": None if self.labels is None else self.labels.tolist(),
            "reason": self.reason,
            "duplicate_lines": list(self.duplicate_lines),
            "background": self.background,
        }

    @classmethod
    def from_json(cls, d: dict) -> VerifyResult:
        labels = None if d["labels"] is None else np.asarray(d["labels"], np.float32).reshape(-1, 5)
        shape = tuple(d["shape_hw"]) if d["shape_hw"] else None
        return cls(shape, labels, d["reason"], tuple(d["duplicate_lines"]), bool(d["background"]))


@dataclass(frozen=True)
class DatasetReport:
    """What scanning a split found: counts, class histogram, and every skipped or odd file."""

    split: str
    n_found: int
    n_kept: int
    n_background: int
    n_labels: int
    class_counts: list[int]
    rejected: tuple[tuple[str, str], ...]  # (image path, reason)
    duplicates: tuple[tuple[str, int, int], ...]  # (label path, first duplicate line, rows dropped)
    orphan_labels: tuple[str, ...]
    image_sizes: dict[str, dict[str, float]]  # {"width"|"height": {"min", "median", "max"}}
    names: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "split": self.split,
            "n_found": self.n_found,
            "n_kept": self.n_kept,
            "n_background": self.n_background,
            "n_labels": self.n_labels,
            "class_counts": list(self.class_counts),
            "names": list(self.names),
            "rejected": [list(r) for r in self.rejected],
            "duplicates": [list(d) for d in self.duplicates],
            "orphan_labels": list(self.orphan_labels),
            "image_sizes": self.image_sizes,
        }

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"{self.split}: {self.n_kept}/{self.n_found} images kept, {self.n_background} background, "
            f"{self.n_labels} labels, {len(self.rejected)} rejected, "
            f"{sum(d[2] for d in self.duplicates)} duplicate rows dropped, "
            f"{len(self.orphan_labels)} orphan label files"
        ]
        if self.image_sizes:
            w, h = self.image_sizes["width"], self.image_sizes["height"]
            lines.append(
                f"  image size (w x h): min {w['min']:g}x{h['min']:g}, "
                f"median {w['median']:g}x{h['median']:g}, max {w['max']:g}x{h['max']:g}"
            )
        empty = [self._name(c) for c, n in enumerate(self.class_counts) if n == 0]
        if empty:
            lines.append(f"  classes without labels: {', '.join(empty[:20])}" + (" ..." if len(empty) > 20 else ""))
        for path, reason in self.rejected[:5]:
            lines.append(f"  rejected {path}: {reason}")
        if len(self.rejected) > 5:
            lines.append(f"  ... and {len(self.rejected) - 5} more rejected")
        return "\n".join(lines)

    def _name(self, c: int) -> str:
        return self.names[c] if c < len(self.names) else str(c)


def label_path_for(img_path: str | Path) -> Path:
    """YOLO convention: the last `images` folder becomes `labels`, the suffix becomes `.txt`.

    An image path without an `images` component gets its label file beside it.
    """
    path = os.fspath(img_path)
    folder, name = os.path.split(path.rstrip(os.sep) or path)
    return _label_folder(folder) / (os.path.splitext(name)[0] + ".txt")


@functools.lru_cache(maxsize=1024)
def _label_folder(folder: str) -> Path:
    """The label folder of an image folder. A split's images share a few folders, so each is
    parsed once (pathlib's parsing was most of a cached scan's time: 2 calls an image)."""
    parts = list(Path(folder).parts)
    for k in range(len(parts) - 1, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            break
    return Path(*parts)


# ---------------------------------------------------------------- verification of one image


def verify_image_label(img_path: Path, label_path: Path, nc: int) -> VerifyResult:
    """Check one image and parse its label file. Never raises for bad data: it returns a reason."""
    shape, reason = _verify_image(img_path)
    if reason:
        return VerifyResult(None, None, reason)
    labels, dup_lines, reason = _parse_labels(label_path, nc)
    if reason:
        return VerifyResult(shape, None, reason)
    return VerifyResult(shape, labels, None, dup_lines, background=len(labels) == 0)


def _verify_image(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    try:
        size = path.stat().st_size
    except OSError:
        return None, "image file missing"
    if size == 0:
        return None, "image file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(max(size - 64, 0))
        tail = f.read(64).rstrip(b"\x00")  # some writers pad the file with zero bytes
    # OpenCV decodes a truncated JPEG partially (grey bottom) without any error. Checked by the
    # magic number, not the suffix, so a JPEG named .png is checked too.
    if head == b"\xff\xd8" and not tail.endswith(b"\xff\xd9"):
        return None, "truncated JPEG (no FF D9 end-of-image marker)"
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        return None, "unreadable or corrupt image"
    h, w = img.shape[:2]
    if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
        return None, f"image too small ({w}x{h} px, need >= {MIN_IMAGE_SIDE} a side)"
    return (int(h), int(w)), None


def _parse_labels(path: Path, nc: int) -> tuple[np.ndarray, tuple[int, ...], str | None]:
    """Parse a label file → ((n, 5) float32 unique rows, duplicate line numbers, reason or None)."""
    empty = np.zeros((0, 5), np.float32)
    if not path.is_file():
        return empty, (), None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return empty, (), f"{path}: unreadable label file ({e})"
    rows, seen, dups = [], set(), []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row, err = _parse_row(line, nc)
        if err:
            return empty, (), f"{path}:{lineno}: {err}"
        key = tuple(row)
        if key in seen:
            dups.append(lineno)
            continue
        seen.add(key)
        rows.append(row)
    labels = np.array(rows, np.float32).reshape(-1, 5)
    return labels, tuple(dups), None


def _parse_row(line: str, nc: int) -> tuple[list[float], str | None]:
    fields = line.split()
    if len(fields) != 5:
        return [], f"expected 5 fields [cls cx cy w h], got {len(fields)}"
    try:
        vals = [float(v) for v in fields]
    except ValueError:
        bad = next(v for v in fields if not _is_float(v))
        return [], f"non-numeric field {bad!r}"
    if not all(math.isfinite(v) for v in vals):
        return [], f"non-finite value in {fields}"
    cls = vals[0]
    if cls != int(cls):
        return [], f"class id {fields[0]} is not an integer"
    if cls < 0:
        return [], f"class id {int(cls)} < 0"
    if cls >= nc:
        return [], f"class id {int(cls)} >= nc {nc}"
    for name, text, v in zip(("cx", "cy", "w", "h"), fields[1:], vals[1:]):
        if v < -COORD_TOL or v > 1 + COORD_TOL:
            return [], f"coordinate {name}={text} outside [0, 1]"
    coords = [min(max(v, 0.0), 1.0) for v in vals[1:]]
    if coords[2] <= 0 or coords[3] <= 0:
        return [], f"non-positive box size w={fields[3]} h={fields[4]}"
    return [float(int(cls)), *coords], None


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- the cache


def default_cache_dir() -> Path:
    """`$KFYOLO_CACHE` or `~/.cache/kfyolo/labels` (never the dataset folder: it may be read-only)."""
    env = os.environ.get("KFYOLO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kfyolo" / "labels"


def cache_file_for(img_files: Sequence[Path], cache_dir: Path) -> Path:
    """The cache file of a split: named by a hash of its sorted image paths."""
    h = hashlib.sha256("\n".join(sorted(str(p) for p in img_files)).encode()).hexdigest()[:24]
    return cache_dir / f"labels-{h}.json"


def _stat(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(img_files: Sequence[Path], nc: int) -> dict:
    # Results depend on nc (class id range) too, so it is part of the fingerprint.
    files = {str(p): [_stat(p), _stat(label_path_for(p))] for p in img_files}
    return {"version": CACHE_VERSION, "nc": nc, "files": files}


def _load_cache(path: Path, fingerprint: dict) -> dict[str, VerifyResult] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("fingerprint") != fingerprint:
            log.info("label cache %s is stale; rescanning", path)
            return None
        return {k: VerifyResult.from_json(v) for k, v in data["results"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("label cache %s is unreadable (%s); ignoring it and rebuilding", path, e)
        return None


def _save_cache(path: Path, fingerprint: dict, results: dict[str, VerifyResult]) -> None:
    data = {"fingerprint": fingerprint, "results": {k: v.to_json() for k, v in results.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file in the same folder, then rename: readers in other processes
        # see either the old file or the complete new one, never a half-written one.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("could not write label cache %s (%s); continuing without it", path, e)


# ---------------------------------------------------------------- scanning a split


def scan_split(
    img_files: Sequence[str | Path],
    nc: int,
    names: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    split: str = "split",
    use_cache: bool = True,
) -> tuple[list[LabelEntry], DatasetReport]:
    """Verify every image and its labels → (kept entries in input order, report).

    Raises DatasetError when no image survives.
    """
    if nc < 1:
        raise ValueError(f"nc must be >= 1, got {nc}")
    files = [Path(p) for p in img_files]
    if not files:
        raise DatasetError(f"split {split!r}: no images found")
    fingerprint = _fingerprint(files, nc)
    cache_path = cache_file_for(files, Path(cache_dir) if cache_dir else default_cache_dir())
    results = _load_cache(cache_path, fingerprint) if use_cache else None
    if results is None:
        n_workers = workers or min(8, os.cpu_count() or 1)
        # Threads suffice: cv2.imread releases the GIL while decoding.
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            out = pool.map(lambda p: verify_image_label(p, label_path_for(p), nc), files)
            results = dict(zip((str(p) for p in files), out))
        if use_cache:
            _save_cache(cache_path, fingerprint, results)
    entries, report = _build_report(files, results, nc, names, split)
    if not entries:
        error = DatasetError(f"split {split!r}: none of {len(files)} images survived validation\n{report.summary()}")
        error.report = report  # the caller writes it next to the run
        raise error
    return entries, report


def _build_report(
    files: list[Path], results: dict[str, VerifyResult], nc: int, names: Sequence[str] | None, split: str
) -> tuple[list[LabelEntry], DatasetReport]:
    entries, rejected, duplicates = [], [], []
    counts = np.zeros(nc, np.int64)
    n_background = 0
    for p in files:
        r = results[str(p)]
        if r.reason is not None:
            log.warning("%s: rejected: %s", p, r.reason)
            rejected.append((str(p), r.reason))
            continue
        if r.duplicate_lines:
            lp = label_path_for(p)
            lines = list(r.duplicate_lines)
            log.warning("%s: dropped %d duplicate row(s) at line(s) %s", lp, len(lines), lines)
            duplicates.append((str(lp), r.duplicate_lines[0], len(r.duplicate_lines)))
        n_background += r.background
        counts += np.bincount(r.labels[:, 0].astype(np.int64), minlength=nc)
        entries.append(LabelEntry(p, r.shape_hw, r.labels))
    orphans = find_orphan_labels(files)
    for o in orphans:
        log.warning("%s: orphan label file (no image beside it)", o)
    report = DatasetReport(
        split=split,
        n_found=len(files),
        n_kept=len(entries),
        n_background=n_background,
        n_labels=int(counts.sum()),
        class_counts=[int(c) for c in counts],
        rejected=tuple(rejected),
        duplicates=tuple(duplicates),
        orphan_labels=tuple(str(o) for o in orphans),
        image_sizes=size_stats([e.shape_hw for e in entries]),
        names=tuple(names) if names else (),
    )
    return entries, report


def report_for_entries(
    entries: Sequence[LabelEntry], nc: int, names: Sequence[str] | None = None, split: str = "split"
) -> DatasetReport:
    """The report of already-validated entries (nothing rejected; orphans still looked up)."""
    results = {
        str(e.img_path): VerifyResult(e.shape_hw, e.labels, background=len(e.labels) == 0) for e in entries
    }
    return _build_report([e.img_path for e in entries], results, nc, names, split)[1]


def size_stats(shapes_hw: Sequence[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """min/median/max of width and height; {} when there are no images."""
    if not shapes_hw:
        return {}
    a = np.asarray(shapes_hw, np.float64)  # (n, 2) [h, w]
    stat = lambda v: {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}  # noqa: E731
    return {"width": stat(a[:, 1]), "height": stat(a[:, 0])}


def find_orphan_labels(img_files: Sequence[Path]) -> list[Path]:
    """Label files in the split's label folders whose image is absent from disk.

    An image present on disk but outside this split (e.g. a val image listed in another txt)
    is not an orphan.
    """
    folders = {(label_path_for(p).parent, p.parent) for p in img_files}
    orphans = []
    for label_dir, img_dir in sorted(folders):
        if label_dir == img_dir or not label_dir.is_dir():
            continue  # labels beside images: every .txt there is a candidate list, not a label
        stems = {f.stem for f in img_dir.iterdir() if is_image_file(f)} if img_dir.is_dir() else set()
        for f in sorted(label_dir.glob("*.txt")):
            if f.stem not in stems and f.name != "classes.txt":
                orphans.append(f)
    return orphans
