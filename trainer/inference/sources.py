"""`--source`: one image, a folder (recursive), a glob, a .txt list of paths, or `s3://bucket/prefix`.

The whole list is made up front, so the progress bar knows its total and a source that names no
image fails before the model loads. Images are then read one at a time, each once: a local file by
OpenCV, an S3 object downloaded beside a scratch folder, decoded, and deleted. An image that cannot
be read raises `ImageError` naming it; the caller decides to skip it.
"""

from __future__ import annotations

import glob
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from trainer.data.config import IMG_SUFFIXES, DataConfigError, is_image_file, resolve_split
from trainer.inference.preprocess import ImageError
from trainer.storage import S3Uri, StorageError, is_s3

GLOB_CHARS = frozenset("*?[")


class SourceError(ValueError):
    """A --source that names no image; the message says which and why."""


@dataclass(frozen=True)
class SourceItem:
    """One image of the source: `name` is what reports and predictions.json show (path or URI)."""

    name: str

    @property
    def stem(self) -> str:
        return Path(self.name.rsplit("/", 1)[-1]).stem


def _local(source: str) -> list[SourceItem]:
    path = Path(source).expanduser()
    if not path.exists() and GLOB_CHARS & set(source):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file() and is_image_file(p)]
        if not files:
            raise SourceError(f"--source {source}: the pattern matches no image ({', '.join(sorted(IMG_SUFFIXES))})")
        return [SourceItem(str(p)) for p in files]
    if not path.exists():
        raise SourceError(f"--source {source}: no such file or folder")
    if path.is_file() and path.suffix.lower() != ".txt" and not is_image_file(path):
        raise SourceError(f"--source {source}: not an image ({', '.join(sorted(IMG_SUFFIXES))}), a folder, "
                          "a glob, a .txt list or an s3:// prefix")
    try:
        files = resolve_split(path)  # a folder recursively; a .txt list keeps missing entries to report them
    except DataConfigError as e:
        raise SourceError(f"--source {source}: {e}") from e
    if not files:
        raise SourceError(f"--source {source}: no images in it ({', '.join(sorted(IMG_SUFFIXES))})")
    return [SourceItem(str(p)) for p in files]


def _remote(source: str) -> list[SourceItem]:
    from trainer.storage import Storage

    uri = S3Uri.parse(source)
    if is_image_file(Path(uri.key)):
        return [SourceItem(str(uri))]
    keys = [k for k in Storage.from_env().list(uri) if is_image_file(Path(k))]
    if not keys:
        raise SourceError(f"--source {source}: no images under that prefix")
    return [SourceItem(str(S3Uri(uri.bucket, k))) for k in keys]


def expand_source(source: str | Path | Sequence[str | Path]) -> list[SourceItem]:
    """Every image a source (or a list of sources) names, in order, each once."""
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise SourceError("--source names nothing")
    items: dict[str, SourceItem] = {}
    for s in map(str, sources):
        for item in (_remote(s) if is_s3(s) else _local(s)):
            items.setdefault(item.name, item)
    return list(items.values())


class ImageReader:
    """Reads source items as (H, W, 3) BGR uint8, each once; S3 objects through a scratch folder."""

    def __init__(self) -> None:
        self._storage = None
        self._scratch: tempfile.TemporaryDirectory | None = None

    def read(self, item: SourceItem) -> np.ndarray:
        if is_s3(item.name):
            return self._read_s3(item.name)
        return read_local(Path(item.name))

    def _read_s3(self, uri: str) -> np.ndarray:
        from trainer.storage import Storage

        if self._storage is None:
            self._storage = Storage.from_env()
            self._scratch = tempfile.TemporaryDirectory(prefix="kfyolo-predict-")
        local = Path(self._scratch.name) / Path(S3Uri.parse(uri).key).name
        try:
            self._storage.download_file(uri, local)
            return read_local(local, shown=uri)
        except StorageError as e:
            raise ImageError(f"{uri}: download failed ({e})") from e
        finally:
            local.unlink(missing_ok=True)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def read_local(path: Path, shown: str | None = None) -> np.ndarray:
    """One image file as BGR, its bytes read once; ImageError naming it when it is missing, truncated
    or does not decode."""
    shown = shown or str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{shown}: file not found") from None
    except OSError as e:
        raise ImageError(f"{shown}: cannot read ({e.strerror or e})") from e
    # OpenCV decodes a truncated JPEG partially (grey bottom) without an error: the dataset scan's check.
    if data[:2] == b"\xff\xd8" and not data[-64:].rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageError(f"{shown}: truncated JPEG (no FF D9 end-of-image marker)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None  # (H, W, 3) BGR, EXIF-rotated
    if img is None or img.size == 0:
        raise ImageError(f"{shown}: not a readable image (corrupt, empty or a format OpenCV cannot decode)")
    return img
