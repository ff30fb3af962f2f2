"""A real kfp.local run of the whole pipeline (K=2 blocks at 64 px, world size 2), and a failing one."""

from __future__ import annotations

import json

from pipelines.__main__ import main
from trainer.checkpoint import load_checkpoint
from trainer.data.config import load_data_config, resolve_split
from trainer.predict import Predictor


def test_tiny_pipeline_runs_end_to_end_from_and_to_s3(tmp_path, synthetic_yaml, s3, capsys):
    """Data from S3, report and final run folder published to S3, no secret in any log."""
    from s3server import SECRET_KEY
    from trainer.storage import Storage

    storage = Storage.from_env()
    storage.upload_dir(synthetic_yaml.parent, "s3://kfyolo/datasets/syn")
    code = main(["run-local", "--data", "s3://kfyolo/datasets/syn/data.yaml", "--blocks", "2", "--epochs-per-block", "1",
                 "--imgsz", "64", "--batch-size", "8", "--workers", "2", "--root", str(tmp_path / "local"),
                 "--publish", "s3://kfyolo/pipelines/t1"])
    out = capsys.readouterr().out
    assert code == 0, out
    for step in ("prepare-dataset", "class-weights", "train-block", "train-block-2", "evaluate", "evaluate-2",
                 "export-model", "report"):
        assert f"ok  {step} (" in out, step
    assert "block 0 evaluation: mAP@.5" in out and "block 1 evaluation: mAP@.5" in out
    assert "report: s3://kfyolo/pipelines/t1/report.html" in out
    keys = storage.list("s3://kfyolo/pipelines/t1")
    assert "pipelines/t1/report.html" in keys and "pipelines/t1/run/weights/last.pt" in keys
    assert "pipelines/t1/run/evaluations/block0/maps.json" in keys
    html = storage.download_file("s3://kfyolo/pipelines/t1/report.html", tmp_path / "report.html").read_text()
    assert "<title>kfyolo run report</title>" in html and "AP per class per block" in html
    assert "Predictions of the exported model" in html and "predicted by the exported model" in html
    # The export step's Model artifact: an ONNX model ONNX Runtime runs, with its metadata, published too.
    assert "pipelines/t1/model/model.onnx" in keys and "pipelines/t1/model/model.json" in keys
    assert "parity onnx vs torch" in out and "detections after NMS identical" in out
    (onnx_file,) = (tmp_path / "local").rglob("onnx_model/model.onnx")
    meta = json.loads((onnx_file.parent / "model.json").read_text())
    assert tuple(meta["names"]) == load_data_config(synthetic_yaml).names and meta["imgsz"] == 64
    assert meta["parity"]["ok"] and meta["input"]["layout"] == "NCHW"
    val = resolve_split(synthetic_yaml.parent / "images/val")[:2]
    dets = Predictor(onnx_file, imgsz=64, conf_thres=0.001).predict(val)
    assert [d.name for d in dets] == [str(p) for p in val] and dets[0].names == tuple(meta["names"])
    last = storage.download_file("s3://kfyolo/pipelines/t1/run/weights/last.pt", tmp_path / "last.pt")
    assert load_checkpoint(last)["epoch"] == 1
    (root,) = [p for p in (tmp_path / "local").iterdir() if p.is_dir()]
    log = (root / "kfp-local.log").read_text()
    assert "Executing task" in log and "Executing task" not in out
    everything = out + log + "".join(p.read_text(errors="ignore") for p in root.rglob("*.log"))
    assert SECRET_KEY not in everything  # credentials come from the environment and stay out of logs


def test_a_failing_step_fails_the_run(tmp_path, capsys):
    code = main(["run-local", "--data", str(tmp_path / "missing.yaml"), "--blocks", "1", "--root", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED prepare-dataset" in captured.out
    assert "DataConfigError" in captured.out and "missing.yaml" in captured.out
    assert "pipeline failed" in captured.err
