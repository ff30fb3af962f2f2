"""The run report: exact numbers in the HTML tables and the summary from hand-built run and
evaluation folders, self-containment (every picture a decodable data: URI), degenerate and
malformed inputs, the CLI, one report from a real tiny run, and a headless-Chromium screenshot."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer.report import ReportError, build_markdown, build_report, main

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["car", "bus", "bike", "kite"]
TRAIN_LABELS = [40, 4, 50, 6]  # shares .40 .04 .50 .06: bus is the rarest, then kite
# Labels drawn per epoch (E = 2): block 1 = epochs 0-1, block 2 = epochs 2-3.
DRAWS = [[30, 10, 40, 20], [30, 10, 40, 20], [20, 30, 30, 20], [20, 10, 50, 20]]
WEIGHTS = [[0.1, 0.5, 0.1, 0.3]] * 2 + [[0.05, 0.6, 0.05, 0.3]] * 2
EVALS = [  # (P, R, mAP@.5, mAP@.5:.95, per-class AP@.5:.95; -1: no validation labels)
    (0.5, 0.25, 0.4321, 0.2341, [0.30, 0.10, 0.40, -1.0]),
    (0.625, 0.375, 0.5561, 0.3456, [0.35, 0.30, 0.41, -1.0]),
]
VAL_LABELS = [10, 2, 12, 0]


# ------------------------------------------------------------------------------------ fixtures

def _write_image(path: Path, w: int, h: int, seed: int, noise: bool = False) -> None:
    """A picture that compresses like a real one (gradient and boxes), or pure noise (the worst case)."""
    rng = np.random.default_rng(seed)
    if noise:
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    else:
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = np.linspace(40, 220, w, dtype=np.uint8)[None, :, None]
        for x, y, c in zip(rng.integers(0, w, 12), rng.integers(0, h, 12), rng.integers(0, 255, (12, 3))):
            cv2.rectangle(img, (int(x), int(y)), (int(x) + 60, int(y) + 40), [int(v) for v in c], 2)
    assert cv2.imwrite(str(path), img)


def make_run(root: Path, weighting: bool = True, images: bool = True, opt: bool = True) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    header = "epoch,box,obj,cls,total,precision,recall,map50,map,val_box,val_obj,val_cls,lr0,lr1,lr2,train_s,val_s"
    rows = [f"{e},{0.1 - e / 100},{0.02},{0.03},{0.15 - e / 100},0.4,0.2,{0.3 + e / 20},{0.2 + e / 40},"
            f"0.09,0.01,0.02,0.01,0.01,0.01,1.5,0.4" for e in range(4)]
    (run / "results.csv").write_text("\n".join([header, *rows]) + "\n")
    if opt:
        (run / "opt.yaml").write_text("cfg: yolov5n\ndata: d.yaml\nimgsz: 64\nepochs: 4\nbatch_size: 8\n"
                                      f"image_weights: {'true' if weighting else 'false'}\nseed: 0\n")
    if weighting:
        with (run / "image_weights.jsonl").open("w") as f:
            for e in range(4):
                f.write(json.dumps({"epoch": e, "names": NAMES, "maps": [0.0] * 4, "class_weights": WEIGHTS[e],
                                    "class_draws": DRAWS[e], "class_labels": TRAIN_LABELS}) + "\n")
    if images:
        _write_image(run / "train_batch0.jpg", 320, 320, 0)
    return run


def make_eval(root: Path, k: int, images: bool = True, metrics: dict | None = None, noise: bool = False) -> Path:
    ev = root / f"eval{k}"
    ev.mkdir(parents=True)
    p, r, m50, m, ap = EVALS[k]
    per_class = [{"class": n, "labels": VAL_LABELS[c], "precision": 0.5, "recall": 0.5,
                  "ap50": -1.0 if a < 0 else a + 0.2, "ap": a} for c, (n, a) in enumerate(zip(NAMES, ap))]
    record = metrics or {"precision": p, "recall": r, "map50": m50, "map": m, "per_class": per_class,
                         "maps": [a if a >= 0 else 0.2 for a in ap]}
    (ev / "metrics.json").write_text(json.dumps(record, indent=1))
    if images:
        _write_image(ev / "val_batch0_pred.jpg", 1600, 400, 1, noise)  # wider than the 1000 px cap
        _write_image(ev / "val_batch0_labels.jpg", 1600, 400, 2, noise)
        _write_image(ev / "pr_curve.png", 700, 600, 3, noise)
        _write_image(ev / "confusion_matrix.png", 700, 600, 4, noise)
    return ev


class Page(HTMLParser):
    """Collects the title, each table's rows (cell texts and row classes), and every src/href."""

    def __init__(self, text: str):
        super().__init__()
        self.title, self.tables, self.links, self.imgs = "", {}, [], []
        self._in_title, self._table, self._row, self._cell = False, None, None, None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href")]
        if tag == "title":
            self._in_title = True
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = ([], a.get("class") or "")
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.imgs.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in ("td", "th") and self._cell is not None:
            self._row[0].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = self._row = None

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table_id: str) -> list[list[str]]:
        return [cells for cells, _ in self.tables[table_id][1:]]  # without the header row


def _decode(uri: str) -> np.ndarray:
    m = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", uri)
    assert m, uri[:60]
    img = cv2.imdecode(np.frombuffer(base64.b64decode(m.group(2)), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


@pytest.fixture()
def full(tmp_path):
    """A run with weighting, two evaluations, pictures; returns (summary, parsed page, html path)."""
    run = make_run(tmp_path)
    evals = [make_eval(tmp_path, 0), make_eval(tmp_path, 1)]
    out = tmp_path / "out" / "report.html"
    summary = build_report(run, evals, out, title="demo <report>", epochs_per_block=2)
    return summary, Page(out.read_text()), out


# ------------------------------------------------------------------------------------ full report

def test_tables_hold_the_exact_numbers(full):
    _, page, _ = full
    assert page.title == "demo <report>"
    assert page.rows("blocks") == [["1", "0–1", "0.500", "0.250", "0.432", "0.234"],
                                   ["2", "2–3", "0.625", "0.375", "0.556", "0.346"]]
    # One row per class from the rarest to the most common; kite has no validation labels.
    assert page.rows("classes") == [
        ["bus rarest", "4", "4.0 %", "2", "0.100", "0.300", "+0.200"],
        ["kite", "6", "6.0 %", "0", "–", "–", "–"],
        ["car", "40", "40.0 %", "10", "0.300", "0.350", "+0.050"],
        ["bike", "50", "50.0 %", "12", "0.400", "0.410", "+0.010"],
    ]
    assert [cls for _, cls in page.tables["classes"][1:]] == ["rare", "", "", ""]
    # bus: weight 0.5 then 0.6; drawn 20/200 in block 1 and 40/200 in block 2
    assert page.rows("weighting")[0] == ["bus", "4.0 %", "0.500", "10.0 %", "0.600", "20.0 %"]
    assert page.rows("weighting")[1] == ["kite", "6.0 %", "0.300", "20.0 %", "0.300", "20.0 %"]


def test_summary_numbers(full):
    summary, _, out = full
    assert summary.map50 == (0.4321, 0.5561) and summary.map == (0.2341, 0.3456)
    assert summary.block_epochs == ((0, 1), (2, 3))
    assert summary.rare_class == "bus" and summary.rare_classes == (1,)
    assert summary.rare_ap == (0.1, 0.3)
    assert summary.rare_draw_share == pytest.approx((0.1, 0.2))
    assert summary.label_share == pytest.approx((0.4, 0.04, 0.5, 0.06))
    assert summary.class_ap[1][:3] == (0.35, 0.3, 0.41) and math.isnan(summary.class_ap[1][3])
    assert summary.image_weights and summary.html == str(out) and summary.html_bytes == out.stat().st_size
    d = json.loads(json.dumps(summary.to_dict(), allow_nan=False))  # NaN became null
    assert d["class_ap"][0][3] is None and d["rare_class"] == "bus"


def test_self_contained(full):
    _, page, out = full
    text = out.read_text()
    assert len(page.imgs) == 9  # 4 charts, 2 batches, PR curve, confusion matrix, training batch
    for uri in page.imgs:
        assert _decode(uri).shape[1] <= 1000  # downscaled
    assert all(link.startswith("data:") for link in page.links)
    assert not re.search(r"(?:src|href)\s*=\s*(?![\"']?data:)", text)
    assert not re.search(r"url\(|@import|https?://", text)
    assert out.stat().st_size < 1_000_000
    jpeg = [u for u in page.imgs if u.startswith("data:image/jpeg")]
    assert len(jpeg) == 3  # the photos; charts and plots stay PNG


def test_incompressible_pictures_are_shrunk(tmp_path):
    out = tmp_path / "r.html"
    build_report(make_run(tmp_path), [make_eval(tmp_path, 0, noise=True)], out)
    page = Page(out.read_text())
    pictures = [u for u in page.imgs if len(u) > 100_000]  # the 4 noisy evaluation pictures
    assert len(pictures) == 4
    assert all(len(u) <= 150_000 * 4 / 3 + 100 for u in pictures)  # the per-picture cap, base64-encoded
    assert all(u.startswith("data:image/jpeg") for u in pictures)  # PNG plots too big as PNG became JPEG
    assert out.stat().st_size < 1_000_000
    for uri in page.imgs:
        _decode(uri)


def test_markdown(full):
    summary, _, _ = full
    md = build_markdown(summary)
    assert "| 1 | 0–1 | 0.500 | 0.250 | 0.432 | 0.234 |" in md
    assert "| 2 | 2–3 | 0.625 | 0.375 | 0.556 | 0.346 |" in md
    assert "**Rarest class:** bus (4.0 % of training labels)" in md
    assert "| 1 | 0.100 | 10.0 % |" in md and "| 2 | 0.300 | 20.0 % |" in md


# ------------------------------------------------------------------------------------ degenerate inputs

def test_training_only(tmp_path):
    out = tmp_path / "r.html"
    summary = build_report(make_run(tmp_path), [], out)
    page = Page(out.read_text())
    assert "blocks" not in page.tables and "training-only report" in out.read_text()
    assert page.rows("classes")[0] == ["bus rarest", "4", "4.0 %", "–"]  # no AP columns without evaluations
    assert page.rows("weighting")[0][0] == "bus"
    assert summary.map == () and summary.rare_ap == () and summary.rare_class == "bus"
    assert "training-only report" in build_markdown(summary)
    for uri in page.imgs:
        _decode(uri)


def test_training_only_with_block_length(tmp_path):
    out = tmp_path / "r.html"
    build_report(make_run(tmp_path), [], out, epochs_per_block=2)
    page = Page(out.read_text())
    assert page.tables["weighting"][0][0] == ["Class", "Label share", "Weight block 1", "Drawn block 1",
                                              "Weight block 2", "Drawn block 2"]
    assert page.rows("weighting")[0] == ["bus", "4.0 %", "0.500", "10.0 %", "0.600", "20.0 %"]


def test_tied_rarest_classes(tmp_path):
    run = make_run(tmp_path)
    jsonl = run / "image_weights.jsonl"
    jsonl.write_text(jsonl.read_text().replace('"class_labels": [40, 4, 50, 6]', '"class_labels": [40, 5, 50, 5]'))
    out = tmp_path / "r.html"
    summary = build_report(run, [make_eval(tmp_path, 0)], out)
    assert summary.rare_classes == (1, 3) and summary.rare_class == "bus"
    rows = Page(out.read_text()).tables["classes"][1:]
    assert [(cells[0], cls) for cells, cls in rows] == [("bus rarest", "rare"), ("kite rarest", "rare"),
                                                        ("car", ""), ("bike", "")]


def test_no_weighting_no_pictures_no_options(tmp_path):
    run = make_run(tmp_path, weighting=False, images=False, opt=False)
    (run / "train_batch0.jpg").write_bytes(b"not a jpeg")  # unreadable: left out with a warning
    out = tmp_path / "r.html"
    summary = build_report(run, [make_eval(tmp_path, 0, images=False)], out)
    text = out.read_text()
    assert "Image weighting was off for this run" in text and "weighting" not in Page(text).tables
    assert "Not available: val_batch0_pred.jpg, val_batch0_labels.jpg, pr_curve.png, confusion_matrix.png, " \
           "train_batch0.jpg" in text
    # No training label counts anywhere: classes keep their order, nobody is "rarest".
    assert [r[0] for r in Page(text).rows("classes")] == NAMES
    assert summary.rare_class is None and not summary.image_weights
    assert summary.block_epochs == ((0, 3),)  # one evaluation over 4 epochs: E inferred as 4
    assert Page(text).rows("blocks") == [["1", "0–3", "0.500", "0.250", "0.432", "0.234"]]
    assert "(no image weighting)" in build_markdown(summary)


def test_dataset_report_counts_and_rejects(tmp_path):
    run = make_run(tmp_path, weighting=False)
    report = {"split": "train", "n_found": 12, "n_kept": 10, "n_background": 1, "n_labels": 100,
              "class_counts": [10, 60, 25, 5], "names": NAMES,
              "rejected": [["a/images/x.jpg", "corrupt JPEG"], ["a/images/y.png", "line 3: class 9 >= nc 4"]],
              "duplicates": [["a/labels/z.txt", 4, 2]], "orphan_labels": [],
              "image_sizes": {"width": {"min": 1, "median": 640, "max": 9},
                              "height": {"min": 1, "median": 480, "max": 9}}}
    out = tmp_path / "r.html"
    summary = build_report(run, [make_eval(tmp_path, 0)], out, dataset_report=report)
    page = Page(out.read_text())
    assert summary.rare_class == "kite"  # 5 of 100 labels
    assert page.rows("classes")[0][:3] == ["kite rarest", "5", "5.0 %"]
    assert page.rows("dataset") == [["train", "12", "10", "1", "100", "2", "2", "0", "640 × 480"]]
    assert page.rows("rejected") == [["train", "a/images/x.jpg", "corrupt JPEG"],
                                     ["train", "a/images/y.png", "line 3: class 9 >= nc 4"]]


def test_nan_values(tmp_path):
    run = make_run(tmp_path)
    csv = run / "results.csv"
    csv.write_text(csv.read_text().replace(",0.4,0.2,", ",nan,nan,"))
    metrics = {"precision": float("nan"), "recall": None, "map50": 0.5, "map": float("nan"),
               "per_class": [{"class": n, "labels": 3, "ap": float("nan")} for n in NAMES]}
    out = tmp_path / "r.html"
    summary = build_report(run, [make_eval(tmp_path, 0, metrics=metrics)], out)
    assert Page(out.read_text()).rows("blocks") == [["1", "0–3", "–", "–", "0.500", "–"]]
    assert math.isnan(summary.rare_ap[0])
    assert "| 1 | 0–3 | – | – | 0.500 | – |" in build_markdown(summary)


# ------------------------------------------------------------------------------------ errors

def test_malformed_metrics_names_file_and_line(tmp_path):
    ev = make_eval(tmp_path, 0)
    (ev / "metrics.json").write_text('{\n "precision": 0.5,\n "recall": oops\n}')
    with pytest.raises(ReportError, match=re.escape(f"{ev / 'metrics.json'}:3: not valid JSON")):
        build_report(make_run(tmp_path), [ev], tmp_path / "r.html")


@pytest.mark.parametrize("case", ["jsonl", "jsonl_keys", "csv", "csv_columns", "no_run", "no_metrics",
                                  "per_class", "class_count", "dataset", "block_length"])
def test_bad_inputs_name_the_file(tmp_path, case):
    run, ev = make_run(tmp_path), make_eval(tmp_path, 0)
    kwargs, expect = {}, ""
    if case == "jsonl":
        with (run / "image_weights.jsonl").open("a") as f:
            f.write("{broken\n")
        expect = "image_weights.jsonl:5: not valid JSON"
    elif case == "jsonl_keys":
        (run / "image_weights.jsonl").write_text('{"epoch": 0}\n')
        expect = "image_weights.jsonl:1: a record needs"
    elif case == "csv":
        (run / "results.csv").write_text("epoch,box\n0,0.1\n1,abc\n")
        expect = "results.csv:3:"
    elif case == "csv_columns":
        (run / "results.csv").write_text("epoch,box\n0,0.1,7\n")
        expect = "results.csv:2: 3 values for 2 columns"
    elif case == "no_run":
        run, expect = tmp_path / "absent", "absent: run folder not found"
    elif case == "no_metrics":
        (ev / "metrics.json").unlink()
        expect = "metrics.json: not found"
    elif case == "per_class":
        (ev / "metrics.json").write_text('{"map": 0.1}')
        expect = "metrics.json: expected an object with a 'per_class' list"
    elif case == "class_count":
        m = json.loads((ev / "metrics.json").read_text())
        (ev / "metrics.json").write_text(json.dumps({**m, "per_class": m["per_class"][:3]}))
        expect = "metrics.json: 3 classes, but"
    elif case == "dataset":
        kwargs["dataset_report"], expect = {"train": [1, 2]}, "dataset_report argument: not a dataset report"
    elif case == "block_length":
        kwargs["epochs_per_block"], expect = 0, "epochs_per_block must be >= 1"
    with pytest.raises(ReportError, match=re.escape(expect)):
        build_report(run, [ev], tmp_path / "r.html", **kwargs)


def test_cli(tmp_path, capsys):
    run, ev0, ev1 = make_run(tmp_path), make_eval(tmp_path, 0), make_eval(tmp_path, 1)
    out, md = tmp_path / "r.html", tmp_path / "r.md"
    assert main(["--run", str(run), "--eval", str(ev0), "--eval", str(ev1), "--out", str(out),
                 "--markdown", str(md), "--epochs-per-block", "2"]) == 0
    assert "| 2 | 2–3 | 0.625 | 0.375 | 0.556 | 0.346 |" in capsys.readouterr().out
    assert md.read_text().startswith("# kfyolo run report") and Page(out.read_text()).title == "kfyolo run report"
    bad = tmp_path / "bad.json"
    bad.write_text("[1,\n")
    assert main(["--run", str(run), "--out", str(out), "--dataset-report", str(bad)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real run, browser

@pytest.fixture(scope="module")
def real_report(tmp_path_factory, synthetic_yaml) -> Path:
    """A report from a real 1-epoch run with image weights and one evaluation of its last weights: the
    report reads what trainer.train and trainer.evaluate actually write."""
    from trainer.evaluate import main as evaluate_main
    from trainer.train import main as train_main

    tmp = tmp_path_factory.mktemp("report-run")
    assert train_main(["--data", str(synthetic_yaml), "--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "8",
                       "--epochs", "1", "--image-weights", "--device", "cpu", "--workers", "0",
                       "--project", str(tmp), "--name", "r"]) == 0
    assert evaluate_main(["--data", str(synthetic_yaml), "--weights", str(tmp / "r" / "weights" / "last.pt"),
                          "--imgsz", "64", "--device", "cpu", "--workers", "0", "--project", str(tmp),
                          "--name", "e0"]) == 0
    out = tmp / "report.html"
    build_report(tmp / "r", [tmp / "e0"], out)
    return out


def test_real_run(real_report, synthetic_yaml):
    import yaml

    names = list(yaml.safe_load(synthetic_yaml.read_text())["names"].values())
    page = Page(real_report.read_text())
    assert sorted(r[0].replace(" rarest", "") for r in page.rows("classes")) == sorted(names)
    assert [r[:2] for r in page.rows("blocks")] == [["1", "0–0"]]
    assert len(page.rows("weighting")) == len(names) and len(page.rows("dataset")) == 2
    assert len(page.imgs) == 8  # map, draw share, losses (no per-block AP chart for one block) + 5 pictures
    for uri in page.imgs:
        _decode(uri)


def test_chromium_screenshot(real_report, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from screenshot_report import find_chromium
    finally:
        sys.path.remove(str(ROOT / "bench"))
    if find_chromium() is None:
        pytest.skip("no Chromium on PATH or at /usr/bin/chromium (system package; apt-get install chromium)")
    png = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "screenshot_report.py"), str(real_report), str(png),
                           "--width", "1280", "--height", "2000"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    img = cv2.imread(str(png))
    assert img is not None and img.shape[:2] == (2000, 1280)
    assert img.std() > 10  # text, tables and charts, not a blank page
    assert (img.reshape(-1, 3) < 100).all(1).mean() > 0.002  # some dark ink (the text) was drawn


def test_study_baseline_column(tmp_path):
    """A study.json whose set has the run's class names puts its uniform per-class AP beside the run;
    one from another dataset is ignored (with a warning), not shown as if it applied."""
    run = make_run(tmp_path)
    row = {"seeds": [10, 11, 12], "per_class_ap": [0.11, 0.22, 0.33, 0.44], "map": [0.25, 0.02],
           "map50": [0.4, 0.03]}
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"summary": {"other": {"names": ["x", "y", "z", "w"], "variants": {"uniform": row}},
                                             "mine": {"names": NAMES, "variants": {"uniform": row}}}}))
    out, evaluation = tmp_path / "r.html", make_eval(tmp_path, 0)
    build_report(run, [evaluation], out, study=study)
    page = Page(out.read_text())
    head, *rows = page.tables["classes"]
    assert head[0][-1] == "Uniform baseline"
    by_name = {cells[0].split()[0]: cells[-1] for cells, _ in rows}
    assert by_name == {n: f"{ap:.3f}" for n, ap in zip(NAMES, row["per_class_ap"])}
    assert "uniform in the study (mine, seeds 10, 11, 12)" in out.read_text()
    study.write_text(json.dumps({"summary": {"other": {"names": ["x", "y", "z", "w"], "variants": {"uniform": row}}}}))
    build_report(run, [evaluation], out, study=study)
    assert "Uniform baseline" not in out.read_text()


def test_classes_without_training_labels_are_never_the_rarest():
    """COCO128 has 9 classes with no training label: the rarest is the rarest of those with labels."""
    from trainer.report import summarise

    names = ("a", "b", "c", "d")
    counts = np.array([50, 0, 3, 0])
    run = type("Run", (), {"weighting": [], "opt": {}, "results": {}})()
    s = summarise("t", run, [], names, counts, None)
    assert s.rare_classes == (2,) and s.rare_class == "c"
    s = summarise("t", run, [], names, np.array([0, 0, 0, 0]), None)
    assert s.rare_classes == () and s.rare_class is None


def test_the_draw_share_chart_shows_labelled_classes_rarest_and_commonest():
    from trainer.report_charts import MAX_BARS, draw_share_chart, draw_share_classes

    share = np.zeros(80)
    share[10:] = np.linspace(1, 70, 70)  # 10 classes without labels
    keep, title = draw_share_classes(share / share.sum())
    assert len(keep) == MAX_BARS and not set(keep) & set(range(10))
    assert list(keep[:3]) == [10, 11, 12] and list(keep[-2:]) == [78, 79] and "of 70 classes with labels" in title
    keep, title = draw_share_classes(np.array([0.5, 0.0, 0.2, 0.3]))
    assert list(keep) == [2, 3, 0] and title == ""
    assert list(draw_share_classes(np.full(3, np.nan))[0]) == [0, 1, 2]
    png = draw_share_chart([f"c{k}" for k in range(80)], share / share.sum(), share / share.sum(), share / share.sum(),
                           "epoch 0", "epoch 9")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_change_that_rounds_to_zero_is_neither_green_nor_red():
    from trainer.report_charts import signed_change

    assert signed_change(0.0004) == "0.000" and signed_change(-0.0004) == "0.000"
    assert signed_change(0.0126) == '<span class="up">+0.013</span>'
    assert signed_change(-0.2) == '<span class="down">-0.200</span>'


def test_class_rows_put_classes_without_labels_last():
    from types import SimpleNamespace

    from trainer.report_charts import _class_order

    page = SimpleNamespace(summary=SimpleNamespace(label_share=(0.5, 0.0, 0.1, float("nan"), 0.4)))
    assert _class_order(page) == [2, 4, 0, 1, 3]
