"""The run report: one self-contained HTML page (and a short Markdown) saying whether the
evaluation-driven image weighting helped, block by block.

    python -m trainer.report --run runs/train/exp --eval runs/val/b0 --eval runs/val/b1 \\
        --out report.html [--epochs-per-block 5] [--dataset-report report.json] [--markdown report.md]

Block k (0-based) covers epochs [k*E, (k+1)*E) and evaluation k was made right after it. Without
--epochs-per-block, E is the number of epochs in results.csv divided by the number of evaluations
(rounded up). The page inlines its CSS and pictures (`data:` URIs), so the KFP UI, the MinIO console
or a plain file browser show it as is.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from trainer import __version__
from trainer import report_charts as page

log = logging.getLogger("trainer")


class ReportError(ValueError):
    """A report input is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class ReportSummary:
    """What the pipeline logs next to the HTML. Per-block tuples have one entry per evaluation;
    NaN marks a value that is unknown (a class without validation labels, no weighting record)."""

    title: str
    names: tuple[str, ...]
    label_share: tuple[float, ...]  # (nc,) share of training labels, NaN when counts are unknown
    block_epochs: tuple[tuple[int, int], ...]  # (B,) first and last epoch, inclusive; (-1, -1) unknown
    precision: tuple[float, ...]  # (B,)
    recall: tuple[float, ...]
    map50: tuple[float, ...]
    map: tuple[float, ...]
    class_ap: tuple[tuple[float, ...], ...]  # (B, nc) AP@.5:.95
    image_weights: bool  # the sampler weighted images (anything but uniform)
    rare_classes: tuple[int, ...]  # classes with the smallest label share (ties kept)
    rare_class: str | None  # name of the first of them
    rare_ap: tuple[float, ...]  # (B,)
    rare_draw_share: tuple[float, ...]  # (B,) share of drawn labels in that block's epochs
    sampler: str = "?"  # uniform, classic, rfs or adaptive (from the weighting records or opt.yaml)
    html: str = ""
    html_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""
        def clean(x: Any) -> Any:
            if isinstance(x, float):
                return x if math.isfinite(x) else None
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x
        return {k: clean(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RunFiles:
    """What the training run folder holds; absent optional files are empty."""

    path: Path
    opt: dict[str, Any]
    results: dict[str, np.ndarray]  # results.csv column -> (E,) float, one row per epoch
    weighting: tuple[dict[str, Any], ...]  # image_weights.jsonl records, by epoch
    dataset: dict[str, dict[str, Any]]  # split -> DatasetReport.to_dict()


@dataclass(frozen=True)
class Evaluation:
    """One block's evaluation folder."""

    path: Path
    metrics: dict[str, Any]
    names: tuple[str, ...]
    ap: np.ndarray = field(repr=False)  # (nc,) AP@.5:.95, NaN without validation labels
    labels: np.ndarray = field(repr=False)  # (nc,) validation label counts


# ------------------------------------------------------------------------------------ reading inputs

def read_json(path: Path) -> Any:
    """Parse a JSON file; ReportError names the file and line when it is unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e


def _number(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _read_results(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        return {}
    header = [h.strip() for h in lines[0].split(",")]
    if "epoch" not in header:
        raise ReportError(f"{path}:1: no 'epoch' column in the header")
    rows: dict[int, list[float]] = {}  # by epoch: a resumed run may have rewritten one; the last row wins
    for n, line in enumerate(lines[1:], start=2):
        cells = line.split(",")
        if len(cells) != len(header):
            raise ReportError(f"{path}:{n}: {len(cells)} values for {len(header)} columns")
        try:
            values = [float(c) for c in cells]
        except ValueError as e:
            raise ReportError(f"{path}:{n}: {e}") from e
        rows[int(values[header.index("epoch")])] = values
    table = np.array([rows[e] for e in sorted(rows)], dtype=np.float64).reshape(-1, len(header))  # (E, columns)
    return {h: table[:, i] for i, h in enumerate(header)}


def _read_weighting(path: Path) -> tuple[dict[str, Any], ...]:
    if not path.is_file():
        return ()
    records = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{n}: not valid JSON: {e.msg}") from e
        keys = ("epoch", "class_weights", "class_draws", "class_labels")
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            raise ReportError(f"{path}:{n}: a record needs the keys {', '.join(keys)}")
        records[int(rec["epoch"])] = rec
    return tuple(records[e] for e in sorted(records))


def _splits(report: Any, source: str) -> dict[str, dict[str, Any]]:
    """A DatasetReport dict, or {split: DatasetReport dict} -> {split: dict}."""
    if isinstance(report, dict) and "split" in report and "class_counts" in report:
        return {str(report["split"]): report}
    if isinstance(report, dict) and all(isinstance(v, dict) and "class_counts" in v for v in report.values()):
        return dict(report)
    raise ReportError(f"{source}: not a dataset report (expected class_counts, rejected, ...)")


def load_run(run_dir: Path) -> RunFiles:
    """Read a training run folder; only the folder itself is required."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: run folder not found")
    opt: dict[str, Any] = {}
    if (run_dir / "opt.yaml").is_file():
        try:
            opt = yaml.safe_load((run_dir / "opt.yaml").read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ReportError(f"{run_dir / 'opt.yaml'}: not valid YAML: {e}") from e
        if not isinstance(opt, dict):
            raise ReportError(f"{run_dir / 'opt.yaml'}: expected a mapping of options")
    ds_path = run_dir / "dataset_report.json"
    dataset = _splits(read_json(ds_path), str(ds_path)) if ds_path.is_file() else {}
    return RunFiles(run_dir, opt, _read_results(run_dir / "results.csv"),
                    _read_weighting(run_dir / "image_weights.jsonl"), dataset)


def load_evaluation(path: Path) -> Evaluation:
    """Read an evaluation folder's metrics.json (required)."""
    path = Path(path)
    mpath = path / "metrics.json"
    if not mpath.is_file():
        raise ReportError(f"{mpath}: not found (is {path} an evaluation folder?)")
    metrics = read_json(mpath)
    per_class = metrics.get("per_class") if isinstance(metrics, dict) else None
    if not isinstance(per_class, list) or not all(isinstance(c, dict) for c in per_class):
        raise ReportError(f"{mpath}: expected an object with a 'per_class' list")
    labels = np.array([_number(c.get("labels")) for c in per_class], dtype=np.float64).reshape(-1)
    ap = np.array([_number(c.get("ap")) for c in per_class], dtype=np.float64).reshape(-1)
    ap[(ap < 0) | (labels == 0)] = np.nan  # -1: the class has no validation labels, so no AP
    names = tuple(str(c.get("class", i)) for i, c in enumerate(per_class))
    return Evaluation(path, metrics, names, ap, np.nan_to_num(labels).astype(np.int64))


# ------------------------------------------------------------------------------------ analysis

def _class_names(run: RunFiles, evals: Sequence[Evaluation], dataset: dict[str, dict]) -> tuple[str, ...]:
    """Names from the first source that has them; every other source must agree on the class count."""
    sources: list[tuple[str, Sequence[str] | int]] = []
    if run.weighting:
        rec = run.weighting[0]
        sources.append((str(run.path / "image_weights.jsonl"), rec.get("names") or len(rec["class_labels"])))
    sources += [(str(e.path / "metrics.json"), e.names) for e in evals]
    sources += [(f"dataset report ({s})", r.get("names") or len(r["class_counts"])) for s, r in dataset.items()]
    names: tuple[str, ...] = ()
    for src, value in sources:
        n = value if isinstance(value, int) else len(value)
        if names and n != len(names):
            raise ReportError(f"{src}: {n} classes, but {sources[0][0]} has {len(names)}")
        if not names:
            names = tuple(str(v) for v in value) if not isinstance(value, int) else tuple(map(str, range(n)))
    return names


def _train_counts(run: RunFiles, dataset: dict[str, dict], nc: int) -> tuple[np.ndarray | None, str]:
    if run.weighting:
        return np.asarray(run.weighting[-1]["class_labels"], np.float64), "image_weights.jsonl"
    for src, splits in (("dataset report", dataset), ("dataset_report.json", run.dataset)):
        if "train" in splits and len(splits["train"]["class_counts"]) == nc:
            return np.asarray(splits["train"]["class_counts"], np.float64), src
    return None, ""


def block_ranges(n_blocks: int, per_block: int | None) -> list[tuple[int, int]]:
    """[(first, last)] epochs of each block, inclusive; (-1, -1) when the block length is unknown."""
    if per_block is None:
        return [(-1, -1)] * n_blocks
    return [(k * per_block, (k + 1) * per_block - 1) for k in range(n_blocks)]


def infer_epochs_per_block(run: RunFiles, n_evals: int) -> int | None:
    """E = epochs in results.csv (else opt.yaml's epochs) / number of evaluations, rounded up."""
    if n_evals == 0:
        return None
    n_epochs = int(run.results["epoch"].max()) + 1 if len(run.results.get("epoch", ())) else run.opt.get("epochs")
    return max(1, math.ceil(int(n_epochs) / n_evals)) if isinstance(n_epochs, int) and n_epochs > 0 else None


def run_sampler(run: RunFiles) -> str:
    """The run's sampler: its weighting records say (records before samplers existed were classic),
    else opt.yaml."""
    if run.weighting:
        return str(run.weighting[-1].get("sampler", "classic"))
    o = run.opt
    return str(o.get("sampler") or ("classic" if o.get("image_weights") else "uniform" if o else "?"))


def summarise(title: str, run: RunFiles, evals: Sequence[Evaluation], names: tuple[str, ...],
              counts: np.ndarray | None, per_block: int | None) -> ReportSummary:
    """The numbers the page and the pipeline share."""
    nc = len(names)
    share = counts / counts.sum() if counts is not None and counts.sum() > 0 else np.full(nc, np.nan)
    rare: tuple[int, ...] = ()  # ties kept: two classes equally rare are both highlighted
    labelled = np.isfinite(share) & (share > 0)  # a class with no training label is absent, not rare
    if labelled.any():
        rare = tuple(int(c) for c in np.flatnonzero(labelled & np.isclose(share, share[labelled].min())))
    blocks = block_ranges(len(evals), per_block)
    draws = [page.draw_share(run.weighting, a, b, nc) if a >= 0 else np.full(nc, np.nan) for a, b in blocks]
    metric = lambda key: tuple(_number(e.metrics.get(key)) for e in evals)  # noqa: E731
    return ReportSummary(
        title=title, names=names, label_share=tuple(float(s) for s in share), block_epochs=tuple(blocks),
        precision=metric("precision"), recall=metric("recall"), map50=metric("map50"), map=metric("map"),
        class_ap=tuple(tuple(float(a) for a in e.ap) for e in evals),
        image_weights=bool(run.weighting) and run_sampler(run) != "uniform", sampler=run_sampler(run),
        rare_classes=rare, rare_class=names[rare[0]] if rare else None,
        rare_ap=tuple(float(e.ap[rare[0]]) for e in evals) if rare else (),
        rare_draw_share=tuple(float(d[rare[0]]) for d in draws) if rare else ())


# ------------------------------------------------------------------------------------ entry points

def study_baseline(path: Path, names: Sequence[str], variant: str = "uniform") -> dict[str, Any] | None:
    """The `variant` row of bench/study_sampling.py's study.json for the set whose class names are
    `names`: {"label", "ap" (nc,), "map", "map50"}; None (with a warning) when no set matches."""
    record = read_json(path)
    for set_name, sm in (record.get("summary") or {}).items():
        row = (sm.get("variants") or {}).get(variant)
        if list(sm.get("names") or []) == list(names) and row:
            seeds = ", ".join(str(x) for x in row.get("seeds", []))
            return {"label": f"{variant} in the study ({set_name}, seeds {seeds})",
                    "ap": np.asarray(row["per_class_ap"], np.float64), "map": row["map"], "map50": row["map50"]}
    log.warning("%s: no study set has this run's %d class names; no baseline shown", path, len(names))
    return None


def build_report(run_dir: Path, evaluations: Sequence[Path], out_html: Path, title: str = "kfyolo run report",
                 epochs_per_block: int | None = None, dataset_report: dict | None = None,
                 study: Path | None = None, predictions: Path | None = None) -> ReportSummary:
    """Write the self-contained HTML report for a run and its per-block evaluations; return the summary.
    With `study` (a study.json of bench/study_sampling.py) the uniform sampler's per-class AP from
    the study stands beside the run's. With `predictions` (a `trainer.predict` output folder, e.g.
    the pipeline's export step's) its first annotated images are shown."""
    if epochs_per_block is not None and epochs_per_block < 1:
        raise ReportError(f"epochs_per_block must be >= 1, got {epochs_per_block}")
    run = load_run(Path(run_dir))
    evals = [load_evaluation(Path(p)) for p in evaluations]
    dataset = _splits(dataset_report, "dataset_report argument") if dataset_report is not None else run.dataset
    names = _class_names(run, evals, dataset)
    counts, counts_source = _train_counts(run, dataset, len(names))
    inferred = epochs_per_block is None and bool(evals)
    per_block = epochs_per_block if epochs_per_block is not None else infer_epochs_per_block(run, len(evals))
    summary = summarise(title, run, evals, names, counts, per_block)
    html_text = page.render(page.PageInput(
        summary=summary, run=run, evals=tuple(evals), counts=counts, counts_source=counts_source,
        per_block=per_block, per_block_inferred=inferred, dataset=dataset,
        baseline=study_baseline(Path(study), names) if study else None,
        predicted=predicted_images(Path(predictions)) if predictions else None,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(html_text, encoding="utf-8")
    size = out_html.stat().st_size
    if size > 1_500_000:
        log.warning("%s: report is %.1f MB; pictures may be large", out_html, size / 1e6)
    return replace(summary, html=str(out_html), html_bytes=size)


def predicted_images(folder: Path, limit: int = 4) -> tuple[Path, ...]:
    """The first annotated images of a predict output folder (its labels/ and JSON are not pictures)."""
    if not folder.is_dir():
        log.warning("%s: no predictions folder; no exported-model predictions shown", folder)
        return ()
    pictures = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return tuple(pictures[:limit])


def _md(x: float, pct: bool = False) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{100 * x:.1f} %" if pct else f"{x:.3f}"


def build_markdown(summary: ReportSummary) -> str:
    """A short Markdown version: the per-block table and the rarest class's trajectory."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [f"# {esc(summary.title)}", ""]
    if not summary.map:
        lines.append("No evaluations were given: training-only report.")
    else:
        lines += ["| block | epochs | P | R | mAP@.5 | mAP@.5:.95 |", "|---:|:---|---:|---:|---:|---:|"]
        for k, (a, b) in enumerate(summary.block_epochs):
            epochs = f"{a}–{b}" if a >= 0 else "?"
            lines.append(f"| {k + 1} | {epochs} | {_md(summary.precision[k])} | {_md(summary.recall[k])} | "
                         f"{_md(summary.map50[k])} | {_md(summary.map[k])} |")
    if summary.rare_class is not None:
        rare = summary.rare_classes[0]
        lines += ["", f"**Rarest class:** {esc(summary.rare_class)} "
                      f"({_md(summary.label_share[rare], pct=True)} of training labels)"]
        if summary.rare_ap:
            lines += ["", "| block | AP@.5:.95 | share of drawn labels |", "|---:|---:|---:|"]
            lines += [f"| {k + 1} | {_md(ap)} | {_md(d, pct=True)} |"
                      for k, (ap, d) in enumerate(zip(summary.rare_ap, summary.rare_draw_share))]
    lines += ["", f"Sampler: {esc(summary.sampler)}" + ("" if summary.image_weights else " (no image weighting).")]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kfyolo {__version__}")
    p.add_argument("--run", required=True, type=Path, help="training run folder")
    p.add_argument("--eval", dest="evals", action="append", default=[], type=Path,
                   help="evaluation folder of one block, in block order (repeat)")
    p.add_argument("--out", required=True, type=Path, help="HTML file to write")
    p.add_argument("--title", default="kfyolo run report")
    p.add_argument("--epochs-per-block", type=int, default=None)
    p.add_argument("--dataset-report", type=Path, default=None, help="prepare step's report JSON")
    p.add_argument("--markdown", type=Path, default=None, help="also write the Markdown summary here")
    p.add_argument("--study", type=Path, default=None,
                   help="study.json of bench/study_sampling.py: show its uniform baseline beside the run")
    p.add_argument("--predictions", type=Path, default=None,
                   help="a trainer.predict output folder (e.g. of the exported model): show its first images")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    try:
        dataset = read_json(args.dataset_report) if args.dataset_report else None
        if dataset is not None:
            _splits(dataset, str(args.dataset_report))  # name the file, not the argument, on bad structure
        summary = build_report(args.run, args.evals, args.out, args.title, args.epochs_per_block, dataset,
                               args.study, args.predictions)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    markdown = build_markdown(summary)
    if args.markdown:
        args.markdown.write_text(markdown, encoding="utf-8")
    print(markdown, end="")
    log.info("report: %s (%.0f kB)", summary.html, summary.html_bytes / 1e3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
