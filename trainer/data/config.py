"""Data YAML parsing: where a YOLO-format dataset's splits live and what its classes are called.

The YAML follows the ultralytics layout::

    path: ../datasets/coco128   # dataset root; relative to this YAML's folder; default: that folder
    train: images/train2017     # folder, image file, .txt list of images, or a list mixing those
    val: images/val2017
    test:                       # optional
    nc: 80                      # optional; must agree with names
    names: {0: person, 1: bicycle}   # or a list [person, bicycle]

Every problem is reported as a `DataConfigError` naming the YAML file and the key, before any
image is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

IMG_SUFFIXES = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")


class DataConfigError(ValueError):
    """A data YAML (or dict) is missing a key or holds an invalid value."""


@dataclass(frozen=True)
class DataConfig:
    """A parsed data YAML. Split entries are absolute paths (folders, images or .txt lists)."""

    yaml_path: Path | None
    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    test: tuple[Path, ...]
    names: tuple[str, ...]

    @property
    def nc(self) -> int:
        """Number of classes."""
        return len(self.names)

    def split(self, name: str) -> tuple[Path, ...]:
        """The entries of split `name` ('train', 'val' or 'test')."""
        if name not in SPLITS:
            raise DataConfigError(f"{self._source()}: unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def _source(self) -> str:
        return str(self.yaml_path) if self.yaml_path else "<data dict>"


def _abs(path: str | Path) -> Path:
    # Absolute and normalised, but symlinks are kept: label paths derive from the image path.
    return Path(os.path.normpath(os.path.abspath(Path(path).expanduser())))


def is_image_file(path: Path) -> bool:
    """True if `path` has one of the supported image suffixes (case-insensitive)."""
    return path.suffix.lower() in IMG_SUFFIXES


def read_yaml_mapping(path: Path, label: str) -> dict[str, Any]:
    """A YAML file whose top level must be a mapping; errors name `label` (a path or a URI)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataConfigError(f"{label}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise DataConfigError(f"{label}: expected a mapping at top level, got {type(raw).__name__}")
    return raw


def load_data_config(path_or_dict: str | Path | Mapping[str, Any]) -> DataConfig:
    """Parse and validate a data YAML file (or an already-loaded dict).

    For a dict, a relative `path` resolves against the current directory.
    """
    if isinstance(path_or_dict, Mapping):
        yaml_path, raw, base = None, dict(path_or_dict), Path.cwd()
        src = "<data dict>"
    else:
        yaml_path = _abs(path_or_dict)
        src = str(yaml_path)
        if not yaml_path.is_file():
            raise DataConfigError(f"{src}: data YAML not found")
        raw = read_yaml_mapping(yaml_path, src)
        base = yaml_path.parent

    for key in ("train", "val", "names"):
        if raw.get(key) in (None, "", []):
            raise DataConfigError(f"{src}: missing required key {key!r}")

    root = Path(raw["path"]).expanduser() if raw.get("path") not in (None, "") else base
    root = _abs(base / root)
    if not root.is_dir():
        raise DataConfigError(f"{src}: key 'path': dataset root {root} is not a folder")

    names = _parse_names(raw["names"], src)
    if "nc" in raw and raw["nc"] is not None:
        nc = raw["nc"]
        if isinstance(nc, bool) or not isinstance(nc, int) or nc != len(names):
            raise DataConfigError(f"{src}: key 'nc': nc={nc!r} disagrees with {len(names)} names")

    splits = {k: _parse_split(raw.get(k), root, src, k) for k in SPLITS}
    return DataConfig(yaml_path, root, splits["train"], splits["val"], splits["test"], names)


def _parse_names(value: Any, src: str) -> tuple[str, ...]:
    """`names` as a list, or a dict whose keys are exactly 0..nc-1."""
    if isinstance(value, Mapping):
        keys = list(value.keys())
        if any(isinstance(k, bool) or not isinstance(k, int) for k in keys):
            raise DataConfigError(f"{src}: key 'names': dict keys must be integers, got {keys[:5]}")
        if sorted(keys) != list(range(len(keys))):
            raise DataConfigError(
                f"{src}: key 'names': dict keys must be 0..{len(keys) - 1} without gaps, got {sorted(keys)}"
            )
        items = [value[k] for k in range(len(keys))]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
    else:
        raise DataConfigError(f"{src}: key 'names': expected a list or a dict, got {type(value).__name__}")
    if not items:
        raise DataConfigError(f"{src}: key 'names': no class names")
    bad = [n for n in items if n is None or isinstance(n, (list, dict)) or str(n).strip() == ""]
    if bad:
        raise DataConfigError(f"{src}: key 'names': invalid class name(s) {bad}")
    return tuple(str(n) for n in items)


def _parse_split(value: Any, root: Path, src: str, key: str) -> tuple[Path, ...]:
    """One split entry (str or list of str) → absolute existing paths."""
    if value in (None, "", []):
        return ()
    entries = value if isinstance(value, list) else [value]
    out = []
    for entry in entries:
        if not isinstance(entry, (str, Path)):
            raise DataConfigError(f"{src}: key {key!r}: expected a path, got {entry!r}")
        p = _abs(root / Path(entry).expanduser())
        if not p.exists():
            raise DataConfigError(f"{src}: key {key!r}: {p} does not exist")
        if p.is_file() and not (is_image_file(p) or p.suffix.lower() == ".txt"):
            raise DataConfigError(f"{src}: key {key!r}: {p} is neither an image, a folder nor a .txt list")
        out.append(p)
    return tuple(out)


def resolve_split(paths: Path | str | Sequence[Path | str]) -> list[Path]:
    """Expand split entries into a sorted, de-duplicated list of image files.

    Folders are searched recursively; a `.txt` file lists one image per line, relative entries
    resolving against the txt file's folder. Listed images are kept even when missing, so that
    label scanning can report them instead of losing them silently.
    """
    entries = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: set[Path] = set()
    for entry in entries:
        p = _abs(entry)
        if p.is_dir():
            files.update(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.suffix.lower() == ".txt":
            files.update(_read_list(p))
        elif is_image_file(p):
            files.add(p)
        else:
            raise DataConfigError(f"{p}: not an image, a folder or a .txt list of images")
    return sorted(files)


def _read_list(txt: Path) -> list[Path]:
    if not txt.is_file():
        raise DataConfigError(f"{txt}: image list not found")
    out = []
    for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        if not is_image_file(p):
            raise DataConfigError(f"{txt}:{lineno}: {line!r} is not an image file name")
        out.append(_abs(txt.parent / p))
    return out
