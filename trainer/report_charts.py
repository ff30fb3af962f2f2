"""The run report's presentation: matplotlib charts (imported lazily, Agg backend) rendered to PNG,
run images downscaled and inlined as `data:` URIs, and the HTML page built from them, so the file
needs nothing else. `trainer.report` reads the inputs and computes the numbers; this module only
draws and lays out. NaN values print as "–" and leave gaps in lines instead of failing.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np

if TYPE_CHECKING:
    from trainer.report import Evaluation, ReportSummary, RunFiles

log = logging.getLogger("trainer")

MAX_IMAGE_WIDTH = 1000  # px; keeps a page with a handful of pictures well under 1 MB
JPEG_QUALITY = 82
MAX_IMAGE_BYTES = 150_000  # per inlined picture, before base64 (x 4/3)
RARE_COLOUR = "#d62728"
TRAIN_LOSSES = ("box", "obj", "cls", "total")
VAL_LOSSES = ("val_box", "val_obj", "val_cls")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)  # figsize in inches * 100 = pixels, all under MAX_IMAGE_WIDTH
    plt.close(fig)
    return buf.getvalue()


def _block_lines(ax, boundaries: Sequence[float]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and blocks are whole numbers
    for i, x in enumerate(boundaries):
        ax.axvline(x, color="0.55", linestyle="--", linewidth=1, label="block boundary" if i == 0 else None)


def _top(*values: Sequence[float] | np.ndarray) -> float:
    """Upper y limit for scores in [0, 1]: room above the best value, so early low scores stay readable."""
    finite = [float(v) for a in values for v in np.ravel(np.asarray(a, np.float64)) if math.isfinite(v)]
    return min(1.02, max(0.1, 1.15 * max(finite, default=0.0)))


def map_chart(epochs: np.ndarray, map50: np.ndarray, map_: np.ndarray, block_epochs: Sequence[float],
              block_map50: Sequence[float], block_map: Sequence[float], boundaries: Sequence[float]) -> bytes:
    """Per-epoch validation mAP (thin lines, from results.csv) with each block's evaluation (markers).

    epochs, map50, map_: (E,) from results.csv (may be empty); block_*: (B,) with x = the block's last epoch.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    if len(epochs):
        ax.plot(epochs, map50, color="#1f77b4", alpha=0.35, linewidth=1, label="mAP@.5 (per-epoch val)")
        ax.plot(epochs, map_, color="#ff7f0e", alpha=0.35, linewidth=1, label="mAP@.5:.95 (per-epoch val)")
    if len(block_epochs):
        ax.plot(block_epochs, block_map50, "o-", color="#1f77b4", linewidth=2, label="mAP@.5 (block evaluation)")
        ax.plot(block_epochs, block_map, "s-", color="#ff7f0e", linewidth=2, label="mAP@.5:.95 (block evaluation)")
    _block_lines(ax, boundaries)
    ax.set(xlabel="epoch", ylabel="mAP", ylim=(0, _top(map50, block_map50)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, framealpha=0.6)
    return _png(fig)


def class_ap_chart(names: Sequence[str], class_ap: np.ndarray, rare: Sequence[int]) -> bytes:
    """AP@.5:.95 of each class across blocks; the rarest class(es) drawn thick and red.

    class_ap: (B, nc), NaN where a class had no validation labels.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    x = np.arange(1, class_ap.shape[0] + 1)
    for c, name in enumerate(names):
        is_rare = c in rare
        ax.plot(x, class_ap[:, c], "o-" if is_rare else ".-", linewidth=2.5 if is_rare else 1,
                color=RARE_COLOUR if is_rare else None, alpha=1 if is_rare else 0.6,
                label=f"{name} (rarest)" if is_rare else (name if len(names) <= 12 else None))
    ax.set(xlabel="block", ylabel="AP@.5:.95", ylim=(0, _top(class_ap)), xticks=x)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    return _png(fig)


def signed_change(d: float) -> str:
    """A change to 3 decimals, green when it shows a gain, red a loss, plain when it rounds to zero."""
    r = round(d, 3)
    if r == 0:
        return "0.000"
    return f'<span class="{"up" if r > 0 else "down"}">{r:+.3f}</span>'


MAX_BARS = 24  # classes in the draw-share chart


def draw_share_classes(label_share: np.ndarray) -> tuple[np.ndarray, str]:
    """Which classes the draw-share chart shows, in order, and a title saying what was left out."""
    label_share = np.asarray(label_share, dtype=np.float64)
    if not np.isfinite(label_share).any():  # counts unknown: every class, in order
        keep = np.arange(len(label_share))
    else:
        keep = np.flatnonzero(label_share > 0)
        keep = keep[np.argsort(label_share[keep], kind="stable")]  # rarest first
    if len(keep) <= MAX_BARS:
        return keep, ""
    half = MAX_BARS // 2
    return (np.concatenate([keep[:half], keep[-half:]]),
            f"the {half} rarest and the {half} most common of {len(keep)} classes with labels")


def draw_share_chart(names: Sequence[str], label_share: np.ndarray, first: np.ndarray, last: np.ndarray,
                     first_name: str, last_name: str) -> bytes:
    """Grouped bars per class: share of training labels vs share of drawn labels in two epochs, all (nc,).
    Only classes with training labels; with more than MAX_BARS of them (COCO: 71), the rarest and the
    most common halves, rarest first."""
    plt = _pyplot()
    label_share, first, last = (np.asarray(a, dtype=np.float64) for a in (label_share, first, last))
    keep, title = draw_share_classes(label_share)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    x = np.arange(len(keep))
    width = 0.27
    ax.bar(x - width, label_share[keep], width, color="0.6", label="label share (dataset)")
    ax.bar(x, first[keep], width, color="#9ecae1", label=f"draw share, {first_name}")
    ax.bar(x + width, last[keep], width, color="#08519c", label=f"draw share, {last_name}")
    ax.set_xticks(x, [names[k][:14] for k in keep], rotation=30 if len(keep) > 8 else 0, fontsize=8,
                  ha="right" if len(keep) > 8 else "center")
    ax.set(ylabel="share of labels", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _png(fig)


def loss_chart(epochs: np.ndarray, columns: dict[str, np.ndarray], boundaries: Sequence[float]) -> bytes:
    """Train losses (left) and validation losses (right) against epoch, dashed lines at block boundaries.

    columns: results.csv column name -> (E,) values; absent columns are skipped.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.2))
    for ax, keys, title in ((axes[0], TRAIN_LOSSES, "train loss"), (axes[1], VAL_LOSSES, "validation loss")):
        for key in keys:
            if key in columns:
                ax.plot(epochs, columns[key], ".-", linewidth=1.5, label=key)
        _block_lines(ax, boundaries)
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, framealpha=0.6)
    return _png(fig)


def png_uri(data: bytes) -> str:
    """PNG bytes -> data: URI."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_uri(path: Path, photo: bool = True, max_width: int = MAX_IMAGE_WIDTH,
              max_bytes: int = MAX_IMAGE_BYTES) -> str | None:
    """An image file downscaled to `max_width` and inlined: JPEG for photos, PNG for plots.

    A picture still over `max_bytes` (noisy photos, huge confusion matrices) is re-encoded as JPEG
    and shrunk until it fits, so a handful of them keep the page near 1 MB. Returns None (with a
    warning naming the file) when the file is absent or does not decode.
    """
    if not path.is_file():
        return None
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # (H, W, 3) BGR
    if img is None:
        log.warning("%s: not a readable image; left out of the report", path)
        return None
    scale = min(1.0, max_width / img.shape[1])
    while True:
        h, w = max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale))
        small = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) if scale < 1 else img
        ext, mime, params = (".jpg", "jpeg", [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]) if photo else (".png", "png", [])
        ok, buf = cv2.imencode(ext, small, params)
        if not ok:
            log.warning("%s: could not re-encode; left out of the report", path)
            return None
        if buf.size <= max_bytes or w <= 160:
            return f"data:image/{mime};base64," + base64.b64encode(buf.tobytes()).decode("ascii")
        if photo:
            scale *= 0.75
        photo = True  # an oversized plot is tried as JPEG first, then shrunk


# ------------------------------------------------------------------------------------ the page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1060px;margin:0 auto;padding:20px 28px 48px;background:#fff}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:18px;margin:30px 0 8px;padding-bottom:4px;border-bottom:1px solid #ddd}
.meta,.note,figcaption{color:#666;font-size:12.5px}.note{margin:6px 0}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:left;white-space:nowrap}
th{background:#f0f2f5;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.wrap,#options td:last-child{white-space:normal;word-break:break-all}#options{table-layout:fixed;width:100%}
#options td:first-child{width:22%}tr.rare td{font-weight:700;background:#fff5f5}
.badge{display:inline-block;margin-left:2px;padding:0 6px;border-radius:8px;background:#d62728;color:#fff;
font-size:11px;font-weight:600}.up{color:#1a7f37}.down{color:#c62828}
figure{margin:10px 0}figure img{max-width:100%;height:auto;border:1px solid #e4e4e4}.grid figure img{width:100%}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}ul.glance{margin:6px 0 0 0;padding-left:20px}
"""


@dataclass(frozen=True)
class PageInput:
    """Everything the page shows: the summary numbers plus the raw inputs for tables and pictures."""

    summary: ReportSummary
    run: RunFiles
    evals: tuple[Evaluation, ...]
    counts: np.ndarray | None  # (nc,) training label counts
    counts_source: str
    per_block: int | None
    per_block_inferred: bool
    dataset: dict[str, dict[str, Any]]
    generated: str
    baseline: dict[str, Any] | None = None  # trainer.report.study_baseline: per-class AP of the uniform sampler
    predicted: tuple[Path, ...] | None = None  # annotated val images of the exported model (None: no export step)


def draw_share(records: Sequence[dict[str, Any]], first: int, last: int, nc: int) -> np.ndarray:
    """Share of each class among the labels drawn in epochs [first, last] -> (nc,), NaN without records."""
    draws = [np.asarray(r["class_draws"], np.float64) for r in records if first <= int(r["epoch"]) <= last]
    total = np.sum(draws, axis=0) if draws else np.zeros(nc)
    return total / total.sum() if total.sum() > 0 else np.full(nc, np.nan)


def esc(value: Any) -> str:
    return html.escape(str(value))


def fnum(x: Any, digits: int = 3) -> str:
    """A number to `digits` decimals, "–" when missing or not finite."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "–"
    return f"{x:.{digits}f}" if math.isfinite(x) else "–"


def fpct(x: float) -> str:
    return f"{100 * x:.1f} %" if math.isfinite(x) else "–"


def table(head: Sequence[str], rows: Sequence[Sequence[str]], table_id: str, text_cols: int = 1,
          row_classes: Sequence[str] | None = None) -> str:
    """Cells are HTML already escaped; columns from `text_cols` on are right-aligned numbers."""
    cls = lambda i: ' class="num"' if i >= text_cols else ""  # noqa: E731
    out = [f'<table id="{table_id}"><thead><tr>']
    out += [f"<th{cls(i)}>{h}</th>" for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(rows):
        rc = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        out.append(f"<tr{rc}>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    return "".join(out) + "</tbody></table>"


def figure(uri: str | None, caption: str) -> str:
    if uri is None:
        return ""
    return f'<figure><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def _n_epochs(p: PageInput) -> int:
    if len(p.run.results.get("epoch", ())):
        return int(p.run.results["epoch"].max()) + 1
    if p.run.weighting:
        return int(p.run.weighting[-1]["epoch"]) + 1
    return int(p.run.opt.get("epochs") or 0)


def _groups(p: PageInput) -> list[tuple[str, int, int]]:
    """The epoch ranges tables and charts split on: the blocks when their length is known."""
    n = _n_epochs(p)
    if p.per_block is None:
        return [(f"epochs 0–{n - 1}", 0, n - 1)] if n else []
    k = len(p.evals) or math.ceil(n / p.per_block)
    return [(f"block {i + 1}", i * p.per_block, (i + 1) * p.per_block - 1) for i in range(k)]


def _boundaries(p: PageInput) -> list[float]:
    return [a - 0.5 for _, a, _ in _groups(p)[1:]] if p.per_block else []


def _header(p: PageInput) -> str:
    o, s = p.run.opt, p.summary
    model = o.get("cfg") or o.get("weights") or "?"
    rows = [("model", model), ("data", o.get("data", "?")), ("image size", o.get("imgsz", "?")),
            ("epochs", o.get("epochs", "?")), ("batch size (total)", o.get("batch_size", "?")),
            ("sampler", s.sampler), ("validation every", o.get("val_every", 1) if not o.get("noval") else "block end"),
            ("class loss feedback", o.get("cls_feedback") or "off"),
            ("multi-scale", {True: "on", False: "off"}.get(o.get("multi_scale"), "?")),
            ("optimizer", o.get("optimizer", "?")), ("seed", o.get("seed", "?"))]
    if "world_size" in o:
        rows.append(("world size", o["world_size"]))
    rows.append(("evaluations (blocks)", len(p.evals)))
    rows.append(("epochs per block", "?" if p.per_block is None else
                 f"{p.per_block}{' (inferred)' if p.per_block_inferred else ''}"))
    glance = []
    if len(s.map) >= 2:
        glance.append(f"mAP@.5:.95 {fnum(s.map[0])} after block 1 → {fnum(s.map[-1])} after block {len(s.map)}.")
    elif len(s.map) == 1:
        glance.append(f"One block: mAP@.5 {fnum(s.map50[0])}, mAP@.5:.95 {fnum(s.map[0])}.")
    else:
        glance.append("No evaluations were given: this is a training-only report.")
    if p.baseline:
        b = p.baseline
        glance.append(f"Sampler <b>{esc(s.sampler)}</b>; the uniform sampler reached mAP@.5:.95 {fnum(b['map'][0])} ± "
                      f"{fnum(b['map'][1])} ({esc(b['label'])}).")
    if s.rare_class is not None:
        line = f"Rarest class <b>{esc(s.rare_class)}</b> ({fpct(s.label_share[s.rare_classes[0]])} of training labels)"
        if s.rare_ap:
            drawn = " → ".join(fpct(d) for d in s.rare_draw_share) if s.image_weights else "not weighted"
            line += f": AP@.5:.95 per block {' → '.join(fnum(a) for a in s.rare_ap)}; share of drawn labels {drawn}"
        glance.append(line + ".")
    return (f"<h1>{esc(s.title)}</h1><p class=\"meta\">Generated {esc(p.generated)} from {esc(p.run.path)}</p>"
            + table(("option", "value"), [(esc(k), esc(v)) for k, v in rows], "options", text_cols=2)
            + '<ul class="glance">' + "".join(f"<li>{g}</li>" for g in glance) + "</ul>")


def _blocks(p: PageInput) -> str:
    s, res = p.summary, p.run.results
    out = ["<h2>1. mAP per block</h2>"]
    if not p.evals:
        out.append('<p class="note">No evaluations were given; the chart shows the per-epoch validation mAP.</p>')
    else:
        rows = [(str(k + 1), f"{a}–{b}" if a >= 0 else "?", fnum(s.precision[k]), fnum(s.recall[k]),
                 fnum(s.map50[k]), fnum(s.map[k])) for k, (a, b) in enumerate(s.block_epochs)]
        out.append(table(("Block", "Epochs", "P", "R", "mAP@.5", "mAP@.5:.95"), rows, "blocks"))
    ep = res.get("epoch", np.zeros(0))
    if len(ep) or p.evals:
        x = [b if b >= 0 else k for k, (_, b) in enumerate(s.block_epochs)]
        chart = map_chart(ep, res.get("map50", np.full(len(ep), np.nan)), res.get("map", np.full(len(ep), np.nan)),
                          x, s.map50, s.map, _boundaries(p))
        out.append(figure(png_uri(chart), "Validation mAP: per epoch during training (faint) and per block evaluation"))
    return "".join(out)


def _class_order(p: PageInput) -> list[int]:
    share = np.asarray(p.summary.label_share, np.float64)
    known = np.isfinite(share)
    # Rarest labelled class first; classes without training labels (COCO128 has 9) go last, not first.
    return sorted(range(len(share)), key=lambda c: (not known[c] or share[c] == 0, share[c] if known[c] else 0.0, c))


def _classes(p: PageInput) -> str:
    s = p.summary
    out = ["<h2>2. AP per class per block</h2>"]
    if not s.names:
        return out[0] + '<p class="note">No class names found (no evaluation, weighting record or dataset report).</p>'
    head = ["Class", "Train labels", "Share", "Val labels"] + [f"AP block {k + 1}" for k in range(len(p.evals))]
    head += ["Change"] if len(p.evals) >= 2 else []
    head += ["Uniform baseline"] if p.baseline else []
    rows, classes = [], []
    for c in _class_order(p):
        name = esc(s.names[c]) + (' <span class="badge">rarest</span>' if c in s.rare_classes else "")
        row = [name, fnum(p.counts[c], 0) if p.counts is not None else "–", fpct(s.label_share[c]),
               str(int(p.evals[-1].labels[c])) if p.evals else "–"]
        row += [fnum(ap[c]) for ap in s.class_ap]
        if len(p.evals) >= 2:
            d = s.class_ap[-1][c] - s.class_ap[0][c]
            row.append(signed_change(d) if math.isfinite(d) else "–")
        if p.baseline:
            row.append(fnum(p.baseline["ap"][c]) if c < len(p.baseline["ap"]) else "–")
        rows.append(row)
        classes.append("rare" if c in s.rare_classes else "")
    out.append(table(head, rows, "classes", row_classes=classes))
    source = (f"Training label counts from {esc(p.counts_source)}. " if p.counts_source
              else "Training label counts unknown. ")
    out.append(f'<p class="note">{source}Rows go from the rarest class to the most common. AP is COCO AP@.5:.95 '
               "on the validation split of each block's evaluation; – means the class has no validation labels. "
               "Change is the last block's AP minus the first's."
               + (f" Uniform baseline: the mean AP of the {esc(p.baseline['label'])}, trained at equal compute."
                  if p.baseline else "") + "</p>")
    if len(p.evals) >= 2:
        chart = class_ap_chart(s.names, np.asarray(s.class_ap, np.float64), s.rare_classes)
        out.append(figure(png_uri(chart), "AP@.5:.95 per class across blocks (rarest class in red)"))
    return "".join(out)


SAMPLER_NOTES = {
    "uniform": "Sampler uniform: every epoch draws each training image once, whatever the per-class AP.",
    "classic": "Sampler classic: before each epoch every image weighs the sum over its labels of "
               "class_weight × (1 − AP)².",
    "rfs": "Sampler rfs (repeat factor sampling): an image repeats by the largest max(1, √(t / f)) of its classes, "
           "f the fraction of images holding the class.",
    "adaptive": "Sampler adaptive: an image repeats by the largest max(1, √(t / f) × deficit^p) of its classes, "
                "deficit the class's (1 − AP) over the mean (1 − AP), so the classes the model gets wrong now "
                "repeat most.",
}


def _weighting(p: PageInput) -> str:
    s, recs = p.summary, p.run.weighting
    out = ["<h2>3. How the image weighting moved</h2>"]
    if not recs:
        said = p.run.opt.get("image_weights")
        why = ("opt.yaml says image weighting was on, but the run folder has no image_weights.jsonl, so it was "
               "not recorded." if said else "Image weighting was off for this run (no image_weights.jsonl in the run "
               "folder): every epoch drew each training image once, whatever the per-class AP.")
        return out[0] + f'<p class="note">{why}</p>'
    how = SAMPLER_NOTES.get(s.sampler, f"Sampler {esc(s.sampler)}.")
    out.append(f'<p class="note">{how} A class drawn above its label share is being favoured. Weight is the '
               "normalised class factor of the sampler (mean over the epochs), Drawn the share of the epochs' drawn "
               "labels.</p>")
    labels = np.asarray(recs[-1]["class_labels"], np.float64)
    label_share = labels / max(labels.sum(), 1)
    groups = [(g, a, b) for g, a, b in _groups(p) if any(a <= int(r["epoch"]) <= b for r in recs)]
    head = ["Class", "Label share"] + [h for g, _, _ in groups for h in (f"Weight {g}", f"Drawn {g}")]
    rows, classes = [], []
    for c in _class_order(p):
        row = [esc(s.names[c]), fpct(label_share[c])]
        for _, a, b in groups:
            w = [r["class_weights"][c] for r in recs if a <= int(r["epoch"]) <= b]
            row += [fnum(np.mean(w)), fpct(draw_share(recs, a, b, len(s.names))[c])]
        rows.append(row)
        classes.append("rare" if c in s.rare_classes else "")
    out.append(table(head, rows, "weighting", row_classes=classes))
    first, last = recs[0], recs[-1]
    share = lambda r: np.asarray(r["class_draws"], np.float64) / max(sum(r["class_draws"]), 1)  # noqa: E731
    chart = draw_share_chart(s.names, label_share, share(first), share(last),
                             f"epoch {first['epoch']}", f"epoch {last['epoch']}")
    out.append(figure(png_uri(chart), "Share of labels: in the dataset vs drawn in the first and last epoch"))
    return "".join(out)


def _losses(p: PageInput) -> str:
    res = p.run.results
    head = "<h2>4. Loss curves</h2>"
    if not len(res.get("epoch", ())):
        return head + '<p class="note">No results.csv in the run folder: no per-epoch losses to show.</p>'
    chart = loss_chart(res["epoch"], res, _boundaries(p))
    return head + figure(png_uri(chart), "Losses per epoch (dashed: block boundaries)")


def _samples(p: PageInput) -> str:
    out = ["<h2>5. Sample predictions</h2>"]
    missing = []
    if p.evals:
        ev = p.evals[-1].path
        pair = [(ev / f, cap) for f, cap in (("val_batch0_pred.jpg", "predictions (last block)"),
                                             ("val_batch0_labels.jpg", "ground truth"))]
        plots = [(ev / f, cap) for f, cap in (("pr_curve.png", "precision-recall curve (last block)"),
                                              ("confusion_matrix.png", "confusion matrix (last block)"))]
        for items, photo in ((pair, True), (plots, False)):
            figs = [figure(image_uri(path, photo), cap) for path, cap in items]
            missing += [path.name for (path, _), f in zip(items, figs) if not f]
            out.append('<div class="grid">' + "".join(figs) + "</div>")
    else:
        out.append('<p class="note">No evaluation: no validation predictions to show.</p>')
    if p.predicted is not None:
        shown = [figure(image_uri(path), f"{path.name}, predicted by the exported model") for path in p.predicted]
        out.append("<h3>Predictions of the exported model</h3>" + ('<div class="grid">' + "".join(shown) + "</div>" if any(shown) else
                   '<p class="note">The export step wrote no predicted images.</p>'))
    train = figure(image_uri(p.run.path / "train_batch0.jpg"), "first training batch (as drawn, augmented)")
    out.append(train or "")
    if not train:
        missing.append("train_batch0.jpg")
    if missing:
        out.append(f'<p class="note">Not available: {esc(", ".join(missing))}.</p>')
    return "".join(out)


def _dataset(p: PageInput) -> str:
    out = ["<h2>6. Dataset</h2>"]
    if not p.dataset:
        return out[0] + '<p class="note">No dataset report was given.</p>'
    rows, rejected = [], []
    for split, r in p.dataset.items():
        size = r.get("image_sizes") or {}
        med = f"{fnum(size['width']['median'], 0)} × {fnum(size['height']['median'], 0)}" if size else "–"
        rows.append((esc(split), *(fnum(r.get(k), 0) for k in ("n_found", "n_kept", "n_background", "n_labels")),
                     str(len(r.get("rejected", []))), str(sum(int(d[2]) for d in r.get("duplicates", []))),
                     str(len(r.get("orphan_labels", []))), med))
        rejected += [(esc(split), esc(path), esc(reason)) for path, reason in r.get("rejected", [])]
    out.append(table(("Split", "Images found", "Kept", "Background", "Labels", "Rejected", "Duplicate rows",
                      "Orphan labels", "Median size (w × h)"), rows, "dataset"))
    if rejected:
        shown = rejected[:100]  # the page stays small; the full list lives in the dataset report
        out.append(table(("Split", "Rejected file", "Reason"), shown, "rejected", text_cols=3).replace(
            "<td>", '<td class="wrap">'))
        if len(rejected) > len(shown):
            out.append(f'<p class="note">… and {len(rejected) - len(shown)} more rejected files '
                       "(see the dataset report).</p>")
    else:
        out.append('<p class="note">No file was rejected.</p>')
    return "".join(out)


def render(p: PageInput) -> str:
    """The whole page as one HTML string."""
    body = "".join(f(p) for f in (_header, _blocks, _classes, _weighting, _losses, _samples, _dataset))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(p.summary.title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")
