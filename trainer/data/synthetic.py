"""Synthetic shapes dataset: kfyolo's demo and test data, built so image weighting has work to do.

Runbook::

    python -m trainer.data.synthetic --out data/shapes --images 1000 --seed 0
    python -m trainer.data.synthetic --out /tmp/shapes --images 60 --seed 1 --imgsz 128 --val-fraction 0.25
    python -m trainer.data.synthetic --out /tmp/lt1500 --images 1500 --seed 0 --imgsz 128 --long-tail

writes ``images/{train,val}/syn_000123.jpg``, ``labels/{train,val}/syn_000123.txt`` (YOLO lines
``cls cx cy w h``), ``data.yaml`` and ``manifest.json``. Same (images, seed, imgsz, val fraction,
long tail) gives byte-identical files with the same OpenCV build: image k comes from the child seed
``SeedSequence(seed).spawn(N)[k]`` (spawn key ``(k,)``), so it does not depend on N.

What the images hold, and why, is described in trainer/data/shapes.py; ``--long-tail`` switches to
ten classes with label shares spanning ~60x (trainer/data/longtail.py), and its manifest adds the
planned ``label_shares`` and the ``groups`` (rare / common / frequent) of every class.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from trainer.data import longtail, shapes
from trainer.data.shapes import DatasetPlan, render_image

GENERATOR = "kfyolo.synthetic"
GENERATOR_VERSION = 1
JPEG_QUALITY = 90
SPLITS = ("train", "val")


@dataclass(frozen=True)
class DatasetKind:
    """What tells the default and the long-tail dataset apart, as far as the written files go."""

    names: tuple[str, ...]
    rare_class: int
    confusable_pairs: tuple[tuple[int, int], ...]  # (rare, common) class ids
    val_rule: str  # how the val split is stratified, for manifest.json
    long_tail: bool


DEFAULT_KIND = DatasetKind(
    shapes.CLASS_NAMES, shapes.RARE_CLASS, ((shapes.RARE_CLASS, shapes.CONFUSABLE_WITH),),
    f"val gets rare-class images until it holds min(max(ceil(val_fraction * rare), {shapes.MIN_VAL_RARE}), "
    f"rare // 2) {shapes.CLASS_NAMES[shapes.RARE_CLASS]} instances",
    long_tail=False,
)
LONGTAIL_KIND = DatasetKind(
    longtail.LONGTAIL_NAMES, longtail.RARE_CLASS, longtail.CONFUSABLE_PAIRS,
    f"for each class but the most common, rarest first, val gets images holding it until it holds "
    f"min(max(ceil(val_fraction * n), {longtail.MIN_VAL}), n // 2) of its n instances, skipping images that "
    f"would leave train fewer than {longtail.MIN_TRAIN}; images holding only the most common class, and "
    "backgrounds, fill the rest of val",
    long_tail=True,
)


class SyntheticOutputError(FileExistsError):
    """The output folder holds files the generator did not write; it is never overwritten."""


def format_labels(labels: np.ndarray) -> str:
    """YOLO label file text for (n, 5) labels: one ``cls cx cy w h`` line each, 6 decimals."""
    return "".join(f"{int(c)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in labels.tolist())


def _is_ours(manifest: Path) -> bool:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("generator") == GENERATOR


def _prepare_out(out: Path) -> None:
    """Create the split folders; clear a previous generator run, refuse anything else."""
    if out.exists() and not out.is_dir():
        raise SyntheticOutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not _is_ours(out / "manifest.json"):
            raise SyntheticOutputError(
                f"{out}: folder is not empty and has no manifest.json written by {GENERATOR}; "
                "refusing to overwrite it"
            )
        # Stale images from a larger earlier run would otherwise join the new dataset;
        # label caches describe the old files.
        for split in SPLITS:
            for sub in ("images", "labels"):
                shutil.rmtree(out / sub / split, ignore_errors=True)
            (out / "labels" / f"{split}.cache").unlink(missing_ok=True)
    for split in SPLITS:
        for sub in ("images", "labels"):
            (out / sub / split).mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _split_summary(labels: list[np.ndarray], kind: DatasetKind) -> dict:
    counts = np.zeros(len(kind.names), np.int64)
    for lab in labels:
        counts += np.bincount(lab[:, 0].astype(np.int64), minlength=len(kind.names))
    return {
        "images": len(labels),
        "backgrounds": sum(len(lab) == 0 for lab in labels),
        "labels": int(counts.sum()),
        "class_counts": dict(zip(kind.names, counts.tolist())),
        "images_without_rare_class": sum(not (lab[:, 0] == kind.rare_class).any() for lab in labels),
    }


def _manifest(plan: DatasetPlan, labels: list[np.ndarray], kind: DatasetKind, seed: int, imgsz: int,
              val_fraction: float) -> dict:
    names = kind.names
    splits = {s: _split_summary([lab for lab, sp in zip(labels, plan.splits) if sp == s], kind) for s in SPLITS}
    total = sum(np.array(list(splits[s]["class_counts"].values())) for s in SPLITS)
    planned = sum(len(p.objects) for p in plan.images)
    frequencies = {n: round(float(c) / max(int(total.sum()), 1), 6) for n, c in zip(names, total)}
    # The default manifest gains no keys, so its bytes stay what they were.
    long_tail = {"long_tail": True} if kind.long_tail else {}
    groups = {}
    if kind.long_tail:
        train_groups = longtail.class_groups(list(splits["train"]["class_counts"].values()))
        groups = {"label_shares": dict(zip(names, longtail.LONGTAIL_SHARES)),
                  "groups": dict(zip(names, train_groups)), "groups_rule": longtail.GROUPS_RULE}
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "complete": True,
        "seed": seed,
        "images": len(plan.images),
        "imgsz": imgsz,
        "val_fraction": val_fraction,
        **long_tail,
        "jpeg_quality": JPEG_QUALITY,
        "names": list(names),
        "rare_class": names[kind.rare_class],
        "confusable_with": names[kind.confusable_pairs[0][1]],
        "confusable_pairs": [[names[a], names[b]] for a, b in kind.confusable_pairs],
        "class_frequencies": frequencies,
        **groups,
        "splits": splits,
        "dropped_empty_objects": planned - int(total.sum()),
        "val_rare_rule": kind.val_rule,
    }


def _data_yaml_text(kind: DatasetKind, images: int, seed: int, imgsz: int, val_fraction: float) -> str:
    names, (rare, common) = kind.names, kind.confusable_pairs[0]
    header = (
        f"# Synthetic shapes dataset written by trainer.data.synthetic ({GENERATOR} v{GENERATOR_VERSION}).\n"
        f"# Regenerate: python -m trainer.data.synthetic --out <this folder> --images {images} --seed {seed} "
        f"--imgsz {imgsz} --val-fraction {val_fraction!r}{' --long-tail' if kind.long_tail else ''}\n"
        f"# Rare class {names[rare]} is confusable with {names[common]}; "
        "class counts are in manifest.json.\n"
    )
    body = {"path": ".", "train": "images/train", "val": "images/val", "nc": len(names),
            "names": dict(enumerate(names))}
    return header + yaml.safe_dump(body, sort_keys=False)


def generate(out: Path, images: int, seed: int, imgsz: int = 256, val_fraction: float = 0.25,
             long_tail: bool = False) -> Path:
    """Write the synthetic dataset into `out` and return its data YAML path.

    `long_tail` writes the ten-class long-tail kind (trainer/data/longtail.py) instead of the default.
    Raises ValueError for bad arguments and SyntheticOutputError when `out` is a non-empty folder
    that the generator did not write.
    """
    out = Path(out)
    kind = LONGTAIL_KIND if long_tail else DEFAULT_KIND
    plan = (longtail.plan_dataset if long_tail else shapes.plan_dataset)(images, seed, imgsz, val_fraction)
    _prepare_out(out)
    # Marks the folder as ours from the start, so an interrupted run can be overwritten.
    _write_json(out / "manifest.json", {"generator": GENERATOR, "version": GENERATOR_VERSION, "complete": False})
    all_labels = []
    for p, split in zip(plan.images, plan.splits):
        img, labels = render_image(p)
        img_path = out / "images" / split / f"{p.name}.jpg"
        if not cv2.imwrite(str(img_path), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"{img_path}: OpenCV could not write the image")
        (out / "labels" / split / f"{p.name}.txt").write_text(format_labels(labels), encoding="utf-8")
        all_labels.append(labels)
    yaml_path = out / "data.yaml"
    yaml_path.write_text(_data_yaml_text(kind, images, seed, imgsz, val_fraction), encoding="utf-8")
    _write_json(out / "manifest.json", _manifest(plan, all_labels, kind, seed, imgsz, val_fraction))
    return yaml_path


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _open_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.data.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (empty, new, or a previous run)")
    p.add_argument("--images", type=_int_at_least(4), required=True, help="number of images (>= 4)")
    p.add_argument("--seed", type=int, required=True, help="random seed; same seed, same bytes")
    p.add_argument("--imgsz", type=_int_at_least(32), default=256, help="long image side in pixels (>= 32)")
    p.add_argument("--val-fraction", type=_open_fraction, default=0.25, help="share of images in val, in (0, 1)")
    p.add_argument("--long-tail", action="store_true",
                   help="ten classes with label shares spanning ~60x (see trainer/data/longtail.py)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    try:
        yaml_path = generate(args.out, args.images, args.seed, args.imgsz, args.val_fraction, args.long_tail)
    except SyntheticOutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest = json.loads((args.out / "manifest.json").read_text(encoding="utf-8"))
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"wrote {args.images} images ({train['images']} train, {val['images']} val; "
          f"{train['labels'] + val['labels']} labels) to {args.out}; data YAML: {yaml_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
