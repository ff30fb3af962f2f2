"""Prepare a dataset for a pipeline: validate every image and label, copy what survives into one
self-contained folder with its own data YAML, and report what was kept, dropped and why.

    prepared/
      data.yaml            path: ., train: images/train, val: images/val, names
      images/{train,val}/  kept images (names made unique per split)
      labels/{train,val}/  their labels, rewritten from the parsed rows (duplicates dropped)
      report.json          per split: DatasetReport (class histogram, rejected files with reasons,
                           duplicates, orphans, image sizes)

The input is a data YAML, or a folder holding `data.yaml`. The copy makes the pipeline's Dataset
artifact independent of where the data came from and of later changes to it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trainer.data.config import DataConfigError, load_data_config, resolve_split
from trainer.data.labels import DatasetError, LabelEntry, scan_split
from trainer.data.weights import class_counts, class_weights

PREPARED_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PreparedDataset:
    root: Path
    data_yaml: Path
    names: list[str]
    reports: dict[str, dict[str, Any]]  # split -> DatasetReport.to_dict()

    def metadata(self) -> dict[str, Any]:
        """Flat numbers for a KFP artifact's metadata."""
        out: dict[str, Any] = {"nc": len(self.names)}
        for split, r in self.reports.items():
            out[f"{split}_images"] = r["n_kept"]
            out[f"{split}_labels"] = r["n_labels"]
            out[f"{split}_rejected"] = len(r["rejected"])
        return out


def find_data_yaml(source: str | Path) -> Path:
    """A data YAML path, or a folder that holds data.yaml."""
    path = Path(source)
    if path.is_dir():
        path = path / "data.yaml"
    if not path.is_file():
        raise DataConfigError(f"{source}: no data YAML there (give a YAML file or a folder holding data.yaml)")
    return path


def _write_labels(path: Path, labels: np.ndarray) -> None:
    path.write_text("".join(f"{int(r[0])} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}\n" for r in labels))


def _copy_split(entries: list[LabelEntry], out: Path, split: str) -> None:
    img_dir, lbl_dir = out / "images" / split, out / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for e in entries:
        stem, suffix = e.img_path.stem, e.img_path.suffix.lower()
        name = stem
        n = 1
        while name in used:  # same file name from two source folders
            n += 1
            name = f"{stem}_{n}"
        used.add(name)
        shutil.copyfile(e.img_path, img_dir / f"{name}{suffix}")
        _write_labels(lbl_dir / f"{name}.txt", e.labels)


def prepare_dataset(source: str | Path, out: str | Path, workers: int | None = None) -> PreparedDataset:
    """Validate `source` and write the prepared copy into `out` (created; must be empty)."""
    cfg = load_data_config(find_data_yaml(source))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output folder is not empty")
    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict[str, Any]] = {}
    splits = {}
    for split in PREPARED_SPLITS:
        paths = cfg.split(split)
        if not paths:
            continue
        entries, report = scan_split(resolve_split(paths), cfg.nc, cfg.names, workers=workers, split=split)
        _copy_split(entries, out, split)
        reports[split] = report.to_dict()
        splits[split] = f"images/{split}"
    data = {"path": ".", **splits, "names": {i: n for i, n in enumerate(cfg.names)}}
    header = f"# Prepared by kfyolo from {cfg.yaml_path}\n"
    (out / "data.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))
    (out / "report.json").write_text(json.dumps(reports, indent=1))
    return PreparedDataset(out, out / "data.yaml", list(cfg.names), reports)


def class_weight_record(data_yaml: str | Path) -> dict[str, Any]:
    """Inverse label frequency of the training split (empty classes count 1), normalised.

    The record feeds `trainer.train --class-weights`.
    """
    cfg = load_data_config(data_yaml)
    entries, _ = scan_split(resolve_split(cfg.train), cfg.nc, cfg.names, split="train")
    labels = [e.labels for e in entries]
    counts = class_counts(labels, cfg.nc)
    if counts.sum() == 0:
        raise DatasetError(f"{data_yaml}: the training split has no labels to weight classes by")
    weights = class_weights(labels, cfg.nc)
    return {"names": list(cfg.names), "class_weights": [float(w) for w in weights],
            "label_counts": [int(c) for c in counts]}
