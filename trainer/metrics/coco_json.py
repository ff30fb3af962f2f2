"""COCO JSON -> the flat `CocoGT` / `CocoDT` containers, with errors that name the entry.

A fast vectorised parse runs first; only when it fails does a per-entry scan run, to name the
first offending entry (index and content) in a `CocoFormatError`.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import NoReturn

import numpy as np

from trainer.metrics.coco import CocoDT, CocoFormatError, CocoGT

__all__ = ["load_coco_dt", "load_coco_gt"]


def _describe(entry: object, limit: int = 160) -> str:
    try:
        text = json.dumps(entry)
    except (TypeError, ValueError):
        text = repr(entry)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(where: str, what: str, i: int, entry: object, reason: str) -> NoReturn:
    raise CocoFormatError(f"{where}: {what} #{i} {_describe(entry)}: {reason}")


def _is_real(v: object, allow_bool: bool = False) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return allow_bool
    return isinstance(v, (int, float, np.integer, np.floating))


def _read_json(source: object, what: str) -> tuple[object, str]:
    """Load a JSON file, or pass through already-parsed data; returns (data, where)."""
    if not isinstance(source, (str, os.PathLike)):
        return source, f"<{what}>"
    where = os.fspath(source)
    try:
        with open(where, encoding="utf-8") as f:
            return json.load(f), where
    except OSError as e:
        raise CocoFormatError(f"{where}: cannot read the {what} file: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise CocoFormatError(
            f"{where}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"{where}: not UTF-8 text: {e}") from None


def _column(entries: list, key: str, where: str, what: str) -> list:
    try:
        return [e[key] for e in entries]
    except (KeyError, TypeError, IndexError):
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                _fail(where, what, i, e, "is not a JSON object")
            if key not in e:
                _fail(where, what, i, e, f"missing key '{key}'")
        raise


def _reals(values: list, entries: list, key: str, where: str, what: str, allow_bool=False):
    """(N,) finite float64 from a column of numbers."""
    arr = np.asarray(values) if values else np.zeros(0)
    if arr.ndim != 1 or arr.dtype.kind not in ("biuf" if allow_bool else "iuf"):
        for i, v in enumerate(values):
            if not _is_real(v, allow_bool):
                _fail(where, what, i, entries[i], f"'{key}' must be a number, got {v!r}")
    arr = np.asarray(values, np.float64).reshape(len(values))
    bad = np.nonzero(~np.isfinite(arr))[0]
    if len(bad):
        _fail(where, what, bad[0], entries[bad[0]], f"'{key}' must be finite")
    return arr


def _ids(values: list, entries: list, key: str, where: str, what: str) -> np.ndarray:
    """(N,) integer (or string) ids."""
    arr = np.asarray(values) if values else np.zeros(0, np.int64)
    if arr.ndim == 1 and arr.dtype.kind in "iu":
        return arr
    if arr.ndim == 1 and arr.dtype.kind == "U" and all(isinstance(v, str) for v in values):
        return arr
    for i, v in enumerate(values):
        if not (isinstance(v, (str, int, np.integer)) and not isinstance(v, bool)):
            _fail(where, what, i, entries[i], f"'{key}' must be an integer or a string, got {v!r}")
    _fail(where, what, 0, entries[0], f"'{key}' values mix integers and strings")


def _boxes(entries: list, where: str, what: str) -> np.ndarray:
    """(N, 4) float64 [x, y, w, h] with finite values and w, h >= 0."""
    values = _column(entries, "bbox", where, what)
    try:
        arr = np.asarray(values) if values else np.zeros((0, 4))
    except ValueError:  # ragged
        arr = None
    if arr is None or arr.ndim != 2 or arr.shape[1] != 4 or arr.dtype.kind not in "iuf":
        for i, b in enumerate(values):
            if not (isinstance(b, list) and len(b) == 4 and all(_is_real(x) for x in b)):
                _fail(where, what, i, entries[i], "'bbox' must be a list of 4 numbers [x, y, w, h]")
    arr = np.asarray(values, np.float64).reshape(len(values), 4)
    bad = np.nonzero(~np.isfinite(arr).all(1))[0]
    if len(bad):
        _fail(where, what, bad[0], entries[bad[0]], "'bbox' values must be finite")
    bad = np.nonzero((arr[:, 2] < 0) | (arr[:, 3] < 0))[0]
    if len(bad):
        _fail(where, what, bad[0], entries[bad[0]], "'bbox' has a negative width or height")
    return arr


def _list_of(data: object, key: str, where: str, required: bool) -> list:
    if key not in data:
        if required:
            raise CocoFormatError(f"{where}: missing key '{key}' at the top level")
        return []
    if not isinstance(data[key], list):
        raise CocoFormatError(f"{where}: '{key}' must be a list")
    return data[key]


def _optional(anns: list, key: str, default: np.ndarray, where: str, allow_bool=False):
    values = [a.get(key) for a in anns]
    missing = np.array([v is None for v in values], bool)
    if not missing.any():
        return _reals(values, anns, key, where, "annotation", allow_bool)
    out = default.astype(np.float64).copy()
    present = np.nonzero(~missing)[0]
    out[present] = _reals([values[i] for i in present], [anns[i] for i in present], key, where,
                          "annotation", allow_bool)
    return out


def _check_member(ids, allowed, entries, key, where, what, reason) -> None:
    bad = np.nonzero(~np.isin(ids, allowed))[0]
    if len(bad):
        _fail(where, what, bad[0], entries[bad[0]], f"'{key}' {ids[bad[0]].item()!r} {reason}")


def load_coco_gt(source: str | os.PathLike | dict) -> CocoGT:
    """Read a COCO ground-truth file (or its parsed dict) into a validated CocoGT.

    Annotations need image_id, category_id, bbox and id; area defaults to w*h, iscrowd to 0.
    Categories come from 'categories', or from the annotations when that key is absent.
    """
    data, where = _read_json(source, "ground truth")
    if not isinstance(data, dict):
        raise CocoFormatError(f"{where}: ground truth must be a JSON object with 'images'")
    images = _list_of(data, "images", where, required=True)
    anns = _list_of(data, "annotations", where, required=False)
    image_ids = _ids(_column(images, "id", where, "image"), images, "id", where, "image")
    img = _ids(_column(anns, "image_id", where, "annotation"), anns, "image_id", where,
               "annotation")
    cat = _ids(_column(anns, "category_id", where, "annotation"), anns, "category_id", where,
               "annotation")
    ann_id = _ids(_column(anns, "id", where, "annotation"), anns, "id", where, "annotation")
    box = _boxes(anns, where, "annotation")
    area = _optional(anns, "area", box[:, 2] * box[:, 3], where)
    crowd = _optional(anns, "iscrowd", np.zeros(len(anns)), where, allow_bool=True) != 0
    if "categories" in data:
        cats = _list_of(data, "categories", where, required=True)
        cat_ids = _ids(_column(cats, "id", where, "category"), cats, "id", where, "category")
    else:
        cat_ids = np.unique(cat)
    _check_member(img, image_ids, anns, "image_id", where, "annotation", "is not in 'images'")
    _check_member(cat, cat_ids, anns, "category_id", where, "annotation", "is not in 'categories'")
    uniq, first, counts = np.unique(ann_id, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        i = int(np.nonzero(ann_id == dup)[0][1])
        _fail(where, "annotation", i, anns[i], f"duplicate annotation id {dup!r}")
    if ann_id.dtype.kind in "iu" and (ann_id == 0).any():
        warnings.warn(f"{where}: an annotation has id 0; pycocotools counts a detection matched "
                      "to it as a false positive, and so does this evaluation", stacklevel=2)
    return CocoGT(image_ids=image_ids, category_ids=cat_ids, image_id=img, category_id=cat,
                  bbox=box, area=area, iscrowd=crowd, ann_id=ann_id)


def load_coco_dt(source: str | os.PathLike | list, gt: CocoGT) -> CocoDT:
    """Read a COCO detection-results file (or its parsed list) into a validated CocoDT.

    Every detection needs image_id (one of gt's images), category_id, bbox and score.
    Detections of categories absent from gt are kept but not evaluated, as in pycocotools,
    with a warning that counts them.
    """
    data, where = _read_json(source, "detections")
    if not isinstance(data, list):
        raise CocoFormatError(f"{where}: detections must be a JSON list of objects")
    img = _ids(_column(data, "image_id", where, "detection"), data, "image_id", where, "detection")
    cat = _ids(_column(data, "category_id", where, "detection"), data, "category_id", where,
               "detection")
    box = _boxes(data, where, "detection")
    score = _reals(_column(data, "score", where, "detection"), data, "score", where, "detection")
    _check_member(img, gt.image_ids, data, "image_id", where, "detection",
                  "is not an image of the ground truth")
    unknown = np.nonzero(~np.isin(cat, gt.category_ids))[0]
    if len(unknown):
        i = int(unknown[0])
        warnings.warn(f"{where}: {len(unknown)} detections have a category_id absent from the "
                      f"ground truth and are not evaluated; first: #{i} {_describe(data[i])}",
                      stacklevel=2)
    return CocoDT(image_id=img, category_id=cat, bbox=box, score=score)
