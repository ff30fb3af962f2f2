"""A tiny end-to-end run (1 epoch at 64 px) and the files and TensorBoard events it must leave."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.checkpoint import load_checkpoint
from trainer.models.yolo import build_model
from trainer.train import main


def _train(tmp_path: Path, data: Path, *extra: str, name: str = "run") -> tuple[int, Path]:
    code = main(["--data", str(data), "--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4",
                 "--device", "cpu", "--workers", "1", "--project", str(tmp_path), "--name", name, *extra])
    return code, tmp_path / name


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, synthetic_yaml):
    tmp = tmp_path_factory.mktemp("e2e")
    code, run = _train(tmp, synthetic_yaml, "--epochs", "1", "--image-weights", "--multi-scale")
    assert code == 0
    return run


def test_run_folder_layout(one_epoch):
    for f in ("weights/last.pt", "weights/best.pt", "results.csv", "results.png", "hyp.yaml", "opt.yaml",
              "train_batch0.jpg", "train_batch1.jpg", "train_batch2.jpg", "maps.json", "image_weights.jsonl",
              "dataset_report.json"):
        assert (one_epoch / f).is_file(), f
    assert not (one_epoch / "train_batch3.jpg").exists()


def test_results_csv_has_one_row_of_finite_losses(one_epoch):
    rows = list(csv.DictReader((one_epoch / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["epoch"] == "0"
    for key in ("box", "obj", "cls", "val_box", "val_obj", "val_cls"):
        assert 0 < float(rows[0][key]) < 1, key  # a fresh model at 64 px: every loss term is positive
    # The lrs at the end of epoch 0, by hand: 24 images / batch 4 = 6 batches, warm-up over
    # max(3 epochs x 6, 100) = 100 iterations, so the last batch (iteration 5) is 5 % of the way:
    # weights and BN from 0 towards lr0 = 0.01, biases from warmup_bias_lr = 0.1 down to 0.01.
    assert float(rows[0]["lr0"]) == pytest.approx(0.05 * 0.01, rel=1e-3)
    assert float(rows[0]["lr1"]) == pytest.approx(0.05 * 0.01, rel=1e-3)
    assert float(rows[0]["lr2"]) == pytest.approx(0.1 + 0.05 * (0.01 - 0.1), rel=1e-3)
    assert float(rows[0]["train_s"]) > 0 and float(rows[0]["val_s"]) > 0


def test_tensorboard_has_batch_images_and_scalars(one_epoch):
    acc = EventAccumulator(str(one_epoch), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train_batch0", "train_batch1", "train_batch2"} <= set(tags["images"])
    img = acc.Images("train_batch0")[0]
    assert img.width > 0 and img.encoded_image_string[:4] == b"\x89PNG"
    for tag in ("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/map50", "metrics/map",
                "metrics/precision", "val/box_loss", "lr/pg0", "lr/pg2"):
        assert tag in tags["scalars"], tag
        assert len(acc.Scalars(tag)) == 1
    csv_row = next(csv.DictReader((one_epoch / "results.csv").open()))
    assert acc.Scalars("train/box_loss")[0].value == pytest.approx(float(csv_row["box"]), rel=1e-4)


def test_checkpoint_loads_safely_and_rebuilds_the_model(one_epoch):
    ck = load_checkpoint(one_epoch / "weights" / "last.pt")
    assert ck["epoch"] == 0 and ck["names"][5] == "hexagon"
    assert ck["opt"]["imgsz"] == 64 and ck["hyp"]["lr0"] == 0.01
    model = build_model(ck["spec"], names=ck["names"])
    model.load_state_dict(ck["model"])
    out = model.eval().predict(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 11) and torch.isfinite(out).all()
    best = load_checkpoint(one_epoch / "weights" / "best.pt")
    assert best["optimizer"] is None  # stripped at the end of the schedule


def test_image_weight_record(one_epoch):
    record = json.loads((one_epoch / "image_weights.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 0 and len(record["class_draws"]) == 6
    assert sum(record["class_weights"]) == pytest.approx(1.0)
    # maps are all zero before the first evaluation, so weights are the inverse frequencies
    labels = record["class_labels"]
    inv = [1 / max(c, 1) for c in labels]
    assert record["class_weights"] == pytest.approx([w / sum(inv) for w in inv])


def test_dataset_report_is_saved(one_epoch):
    report = json.loads((one_epoch / "dataset_report.json").read_text())
    assert report["train"]["n_kept"] == 24 and report["val"]["n_kept"] == 8


def test_results_plot_end_leaves_it_to_the_run_that_ends_the_schedule(tmp_path, synthetic_yaml):
    """--results-plot end (the pipeline's blocks): a block that stops early draws no results.png and
    removes an earlier one (it would show fewer epochs than results.csv); the run that ends the
    schedule draws it, the option kept from the checkpoint. best.pt is last.pt's file (a hard link)
    when the last epoch was the best, and a file of its own after the end strips it."""
    run = tmp_path / "blocks"
    run.mkdir()
    (run / "results.png").write_bytes(b"a previous block's plot")
    code, _ = _train(tmp_path, synthetic_yaml, "--epochs", "2", "--stop-epoch", "1", "--results-plot", "end",
                     "--exist-ok", name="blocks")
    assert code == 0 and not (run / "results.png").exists() and (run / "results.csv").is_file()
    assert (run / "weights" / "best.pt").stat().st_ino == (run / "weights" / "last.pt").stat().st_ino
    assert main(["--resume", str(run / "weights" / "last.pt"), "--workers", "1"]) == 0
    assert (run / "results.png").stat().st_size > 10_000
    assert [r["epoch"] for r in csv.DictReader((run / "results.csv").open())] == ["0", "1"]
    assert (run / "weights" / "best.pt").stat().st_ino != (run / "weights" / "last.pt").stat().st_ino
    assert load_checkpoint(run / "weights" / "best.pt")["optimizer"] is None  # stripped for inference
