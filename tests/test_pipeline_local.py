"""A real kfp.local run of the whole pipeline (K=2 blocks at 64 px, world size 2), and a failing one."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.__main__ import main
from trainer.checkpoint import load_checkpoint


def test_tiny_pipeline_runs_end_to_end(tmp_path, synthetic_yaml, capsys):
    code = main(["run-local", "--data", str(synthetic_yaml), "--blocks", "2", "--epochs-per-block", "1",
                 "--imgsz", "64", "--batch-size", "8", "--workers", "2", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for step in ("prepare-dataset", "class-weights", "train-block", "train-block-2", "evaluate", "evaluate-2", "report"):
        assert f"ok  {step} (" in out, step
    assert "block 0 evaluation: mAP@.5" in out and "block 1 evaluation: mAP@.5" in out
    (root,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    html = (root / "report.html").read_text()
    assert "<title>kfyolo run report</title>" in html and "AP per class per block" in html
    run = root / "run"
    assert load_checkpoint(run / "weights" / "last.pt")["epoch"] == 1
    assert (run / "evaluations" / "block0" / "maps.json").is_file()
    records = [json.loads(line) for line in (run / "image_weights.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert "Executing task" not in out and "Executing task" in (root / "kfp-local.log").read_text()


def test_a_failing_step_fails_the_run(tmp_path, capsys):
    code = main(["run-local", "--data", str(tmp_path / "missing.yaml"), "--blocks", "1", "--root", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED prepare-dataset" in captured.out
    assert "DataConfigError" in captured.out and "missing.yaml" in captured.out
    assert "pipeline failed" in captured.err
