"""Plots: batch mosaics with boxes (OpenCV) and training curves (matplotlib, imported lazily).

Only this module draws. Metrics and the loop hand it arrays; it writes files and returns images.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch


def class_colour(c: int) -> tuple[int, int, int]:
    """A stable, well-spread RGB colour per class id (golden-ratio hue steps)."""
    h = (c * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _to_uint8_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] or uint8 -> (B, H, W, 3) uint8 RGB."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy() if images.is_floating_point() else images.cpu().numpy()
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def plot_images(images: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray, paths: Sequence[str] | None = None,
                names: Sequence[str] | None = None, fname: str | Path | None = None, max_size: int = 1920,
                max_subplots: int = 16, conf_thres: float = 0.25) -> np.ndarray:
    """Tile a batch into one picture with its boxes and class names; write it to `fname` if given.

    targets: (N, 6) [img, cls, cx, cy, w, h] normalised (labels), or (N, 7) with a trailing
    confidence (predictions; those below `conf_thres` are not drawn). Returns (H, W, 3) RGB uint8.
    An existing file is overwritten (YOLOv5 skipped it, leaving stale pictures from older runs).
    """
    imgs = _to_uint8_images(images)[:max_subplots]
    targets = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    targets = targets.reshape(-1, targets.shape[-1] if targets.size else 6)
    n, h, w = imgs.shape[0], imgs.shape[1], imgs.shape[2]
    cols = math.ceil(math.sqrt(max(n, 1)))
    rows = math.ceil(max(n, 1) / cols)
    scale = min(1.0, max_size / max(rows * h, cols * w))
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    canvas = np.full((rows * th, cols * tw, 3), 255, dtype=np.uint8)
    font = max(0.3, min(tw, th) / 500)
    for i in range(n):
        y0, x0 = (i // cols) * th, (i % cols) * tw
        tile = cv2.resize(imgs[i], (tw, th), interpolation=cv2.INTER_AREA) if scale < 1 else imgs[i].copy()
        _draw_boxes(tile, targets[targets[:, 0] == i], names, font, conf_thres)
        if paths is not None and i < len(paths):
            cv2.putText(tile, Path(paths[i]).name[:40], (3, max(12, int(14 * font * 2))),
                        cv2.FONT_HERSHEY_SIMPLEX, font, (220, 220, 220), 1, cv2.LINE_AA)
        cv2.rectangle(tile, (0, 0), (tw - 1, th - 1), (255, 255, 255), 1)
        canvas[y0:y0 + th, x0:x0 + tw] = tile
    if fname is not None:
        Path(fname).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(fname), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {fname}")
    return canvas


def _draw_boxes(tile: np.ndarray, rows: np.ndarray, names: Sequence[str] | None, font: float, conf_thres: float) -> None:
    h, w = tile.shape[:2]
    for row in rows:
        cls = int(row[1])
        conf = float(row[6]) if rows.shape[1] > 6 else None
        if conf is not None and conf < conf_thres:
            continue
        cx, cy, bw, bh = row[2] * w, row[3] * h, row[4] * w, row[5] * h
        p1 = (int(round(cx - bw / 2)), int(round(cy - bh / 2)))
        p2 = (int(round(cx + bw / 2)), int(round(cy + bh / 2)))
        colour = class_colour(cls)
        cv2.rectangle(tile, p1, p2, colour, max(1, round(font * 2)), cv2.LINE_AA)
        label = names[cls] if names is not None and cls < len(names) else str(cls)
        if conf is not None:
            label = f"{label} {conf:.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
        top = max(p1[1], th + 2)
        cv2.rectangle(tile, (p1[0], top - th - 2), (p1[0] + tw + 2, top), colour, -1)
        cv2.putText(tile, label, (p1[0] + 1, top - 2), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), 1, cv2.LINE_AA)


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                    names: Sequence[str] | None = None) -> np.ndarray:
    """A copy of an (H, W, 3) BGR image with (n, 4) xyxy pixel boxes, class names and scores drawn."""
    h, w = image.shape[:2]
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    rows = np.zeros((len(boxes), 7))  # _draw_boxes' (n, 7) [img, cls, cx, cy, w, h, conf], normalised
    rows[:, 1], rows[:, 6] = classes, scores
    rows[:, 2], rows[:, 3] = (boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h
    rows[:, 4], rows[:, 5] = (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h
    rgb = np.ascontiguousarray(image[:, :, ::-1])  # class_colour is RGB
    _draw_boxes(rgb, rows, names, max(0.4, min(h, w) / 800), conf_thres=0.0)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def plot_results_csv(csv_path: str | Path, out: str | Path | None = None) -> Path:
    """Loss and metric curves from results.csv into results.png (one panel per column). Fixed
    margins instead of tight_layout, which draws the figure once more to measure it (a third of
    the time, at the end of every training run)."""
    from matplotlib.figure import Figure

    csv_path = Path(csv_path)
    data = np.genfromtxt(csv_path, delimiter=",", names=True, dtype=float, encoding="utf-8")
    data = np.atleast_1d(data)
    columns = [c for c in data.dtype.names if c != "epoch"]
    cols = 5
    rows = math.ceil(len(columns) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    for i, col in enumerate(columns):  # only the panels drawn: each empty one cost as much as a full one
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(data["epoch"], data[col], marker=".", linewidth=1.5)
        ax.set_title(col, fontsize=9)
        ax.locator_params(nbins=5)
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.2 / rows, top=1 - 0.15 / rows, wspace=0.32, hspace=0.38)
    out = Path(out) if out is not None else csv_path.with_name("results.png")
    fig.savefig(out, dpi=120)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curve(recall: np.ndarray, precision: np.ndarray, ap50: np.ndarray, names: Sequence[str],
                  fname: str | Path) -> Path:
    """Precision-recall at IoU 0.5: one thin line per class with labels, the class mean thick.

    recall: (R,) grid; precision: (nc, R); ap50: (nc,) with -1 for classes without labels.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    has = ap50 >= 0
    for c in np.nonzero(has)[0]:
        label = f"{names[c]} {ap50[c]:.3f}" if has.sum() <= 20 else None
        ax.plot(recall, precision[c], linewidth=1, alpha=0.6, label=label)
    if has.any():
        ax.plot(recall, precision[has].mean(0), linewidth=3, color="blue",
                label=f"all classes {ap50[has].mean():.3f} mAP@.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-Recall (IoU 0.5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(fname, dpi=120)
    plt.close(fig)
    return Path(fname)


MAX_CONFUSION_CLASSES = 30  # rows and columns shown, background included


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], fname: str | Path) -> Path:
    """(nc + 1, nc + 1) counts, rows predicted, columns true, last = background; each true column
    is normalised so cells read as 'fraction of class X predicted as Y'."""
    plt = _pyplot()
    counts = matrix.astype(np.float64)
    title = "Confusion matrix (conf 0.25, IoU 0.45)"
    keep = np.arange(len(names) + 1)
    if len(names) + 1 > MAX_CONFUSION_CLASSES:  # e.g. COCO's 80: the classes with the most labels, named
        top = np.argsort(-counts[:, :-1].sum(0), kind="stable")[:MAX_CONFUSION_CLASSES - 1]
        keep = np.append(np.sort(top), len(names))
        title += f"\n{len(top)} of {len(names)} classes, those with the most labels"
    m = counts / np.maximum(counts.sum(0, keepdims=True), 1)  # fractions of each true class, all classes
    m = m[np.ix_(keep, keep)]
    labels = [*(names[k] for k in keep[:-1]), "background"]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * n + 2), max(5, 0.45 * n + 1.5)))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for i in range(n):
        for j in range(n):
            if m[i, j] >= 0.005:
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > 0.5 else "black")
    ax.set(xlabel="True", ylabel="Predicted", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(fname, dpi=120)
    plt.close(fig)
    return Path(fname)


def detections_as_targets(dets: Sequence[torch.Tensor], hw: tuple[int, int]) -> torch.Tensor:
    """Per-image (n, 6) xyxy pixel detections -> (N, 7) [img, cls, cx, cy, w, h, conf] normalised,
    the prediction format of `plot_images`."""
    h, w = hw
    rows = []
    for i, d in enumerate(dets):
        d = d.detach().float().cpu()
        cx, cy = (d[:, 0] + d[:, 2]) / 2 / w, (d[:, 1] + d[:, 3]) / 2 / h
        bw, bh = (d[:, 2] - d[:, 0]) / w, (d[:, 3] - d[:, 1]) / h
        rows.append(torch.stack((torch.full_like(cx, i), d[:, 5], cx, cy, bw, bh, d[:, 4]), 1))
    return torch.cat(rows) if rows else torch.zeros(0, 7)
