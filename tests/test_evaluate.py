"""The evaluator CLI, COCO exports cross-checked with pycocotools, weight export, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.coco_export import CocoExporter
from trainer.evaluate import main as evaluate_main
from trainer.export_weights import main as export_main
from trainer.models.foreign_pickle import read_ultralytics_checkpoint
from trainer.train import main as train_main


def _pycocotools(folder: Path) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(folder / "gt.json"))
        dt = gt.loadRes(str(folder / "predictions.json"))
        e = COCOeval(gt, dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return list(e.stats)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, synthetic_yaml) -> Path:
    tmp = tmp_path_factory.mktemp("evalrun")
    assert train_main(["--data", str(synthetic_yaml), "--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4",
                       "--epochs", "1", "--device", "cpu", "--workers", "0", "--project", str(tmp), "--name", "r"]) == 0
    return tmp / "r" / "weights" / "best.pt"


def test_official_weights_on_coco128_match_pycocotools_on_the_saved_json(shared, tmp_path):
    code = evaluate_main(["--data", str(shared / "datasets/coco128/coco128.yaml"), "--weights",
                          str(shared / "weights/yolov5n.pt"), "--imgsz", "320", "--device", "cpu", "--save-json",
                          "--project", str(tmp_path), "--name", "coco"])
    assert code == 0
    out = tmp_path / "coco"
    ours = json.loads((out / "metrics.json").read_text())
    reference = _pycocotools(out)
    for key, ref in zip(ours["coco"], reference):
        assert ours["coco"][key] == pytest.approx(ref, abs=1e-4), key
    assert 0.40 < ours["map50"] < 0.52 and 0.25 < ours["map"] < 0.34  # yolov5n at 320 px on COCO128
    assert len(json.loads((out / "maps.json").read_text())["maps"]) == 80
    for f in ("pr_curve.png", "confusion_matrix.png", "val_batch0_labels.jpg", "val_batch0_pred.jpg"):
        assert (out / f).stat().st_size > 1000, f


def test_batch_pictures_are_drawn_beside_the_loop_and_a_failed_one_is_a_warning(synthetic_yaml, tiny_checkpoint,
                                                                               tmp_path, monkeypatch, capsys):
    """The pictures of the first batches come from the plot thread, each batch's pair in full; a
    picture that raises leaves a warning and every metric file written."""
    import threading

    import trainer.plots as plots

    real, drawn_on = plots.plot_images, set()

    def spy(*args, **kwargs):
        drawn_on.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "plot_images", spy)
    args = ["--data", str(synthetic_yaml), "--weights", str(tiny_checkpoint), "--imgsz", "64", "--batch-size", "2",
            "--device", "cpu", "--project", str(tmp_path)]
    assert evaluate_main([*args, "--name", "ok"]) == 0
    assert drawn_on and all(name.startswith("plots") for name in drawn_on)
    assert sorted(f.name for f in (tmp_path / "ok").glob("val_batch*")) == [
        f"val_batch{i}_{kind}.jpg" for i in range(3) for kind in ("labels", "pred")]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "plot_images", broken)
    capsys.readouterr()
    assert evaluate_main([*args, "--name", "broken"]) == 0
    err = capsys.readouterr().err
    assert err.count("a validation batch picture failed: OSError: disk full") == 3
    assert (tmp_path / "broken" / "metrics.json").is_file() and (tmp_path / "broken" / "maps.json").is_file()


def test_evaluate_a_kfyolo_checkpoint_on_synthetic_data(synthetic_yaml, tiny_checkpoint, tmp_path, capsys):
    assert evaluate_main(["--data", str(synthetic_yaml), "--weights", str(tiny_checkpoint), "--imgsz", "64",
                          "--device", "cpu", "--save-json", "--project", str(tmp_path), "--name", "syn"]) == 0
    table = capsys.readouterr().out
    assert "Class" in table and "all" in table
    out = tmp_path / "syn"
    record = json.loads((out / "metrics.json").read_text())
    assert record["images"] == 8 and record["weights_format"] == "kfyolo"
    assert [c["class"] for c in record["per_class"]][-1] == "hexagon"
    assert _pycocotools(out)[0] == pytest.approx(record["coco"]["AP"], abs=1e-4)
    gt = json.loads((out / "gt.json").read_text())
    assert min(a["id"] for a in gt["annotations"]) == 1  # id 0 means "unmatched" to pycocotools
    assert sum(c["labels"] for c in record["per_class"]) == len(gt["annotations"])


def test_class_count_mismatch_is_a_clear_error(tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "two.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: .\nval: .\nnames: [a, b]\n")
    assert evaluate_main(["--data", str(data), "--weights", str(tiny_checkpoint), "--imgsz", "64",
                          "--device", "cpu", "--project", str(tmp_path)]) == 2
    assert "predicts 6 classes" in capsys.readouterr().err


def test_a_checkpoint_with_another_architecture_lists_the_mismatched_keys(tmp_path, tiny_checkpoint, synthetic_yaml, capsys):
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["model"]["model.2.cv1.conv.weight"] = torch.zeros(3, 3, 1, 1)
    del ckpt["model"]["model.4.cv3.bn.bias"]
    bad = save_checkpoint(ckpt, tmp_path / "bad.pt")
    assert evaluate_main(["--data", str(synthetic_yaml), "--weights", str(bad), "--device", "cpu",
                          "--imgsz", "64", "--project", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "2 mismatched keys" in err
    assert "model.2.cv1.conv.weight model (16, 32, 1, 1) vs file (3, 3, 1, 1)" in err
    assert "model.4.cv3.bn.bias model (64,) vs file absent" in err


def test_training_refuses_weights_of_another_architecture(tmp_path, tiny_checkpoint, synthetic_yaml, capsys):
    code = train_main(["--data", str(synthetic_yaml), "--cfg", "yolov5s", "--weights", str(tiny_checkpoint),
                       "--imgsz", "64", "--epochs", "1", "--device", "cpu", "--project", str(tmp_path)])
    assert code == 2
    assert "another architecture than the model" in capsys.readouterr().err


def test_missing_and_foreign_weights(tmp_path, synthetic_yaml, capsys):
    assert evaluate_main(["--data", str(synthetic_yaml), "--weights", str(tmp_path / "nope.pt")]) == 2
    assert "file not found" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert evaluate_main(["--data", str(synthetic_yaml), "--weights", str(junk)]) == 2
    assert "neither a kfyolo checkpoint" in capsys.readouterr().err


def test_export_official_weights_to_a_weights_only_checkpoint(shared, tmp_path):
    out = tmp_path / "y5n.pt"
    assert export_main(["--weights", str(shared / "weights/yolov5n.pt"), "--out", str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    official = read_ultralytics_checkpoint(shared / "weights/yolov5n.pt")
    assert ckpt["names"] == official.names and ckpt["spec"]["name"] == "yolov5n"
    assert set(ckpt["model"]) == set(official.state_dict)
    for k, v in official.state_dict.items():
        assert torch.equal(ckpt["model"][k], v.float() if v.is_floating_point() else v), k


def test_coco_exporter_ids():
    numeric = CocoExporter(["a"])
    numeric("x/000000000009.jpg", torch.zeros(0, 6).numpy(), torch.tensor([[0, 1, 2, 11, 22]]).numpy(), (100, 200))
    numeric("x/000000000025.jpg", torch.tensor([[1, 2, 3, 4, 0.9, 0]]).numpy(), torch.zeros(0, 5).numpy(), (50, 60))
    gt = numeric.ground_truth()
    assert [i["id"] for i in gt["images"]] == [9, 25]
    assert gt["annotations"] == [{"id": 1, "image_id": 9, "category_id": 0, "bbox": [1.0, 2.0, 10.0, 20.0],
                                  "area": 200.0, "iscrowd": 0}]
    assert numeric.detections() == [{"image_id": 25, "category_id": 0, "bbox": [1.0, 2.0, 2.0, 2.0], "score": 0.9}]
    named = CocoExporter(["a"])
    named("cat.jpg", torch.zeros(0, 6).numpy(), torch.zeros(0, 5).numpy(), (10, 10))
    named("dog.jpg", torch.zeros(0, 6).numpy(), torch.zeros(0, 5).numpy(), (10, 10))
    assert [i["id"] for i in named.ground_truth()["images"]] == [0, 1]


def test_export_weights_defaults_to_the_runs_folder(shared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as if in the repository root
    assert export_main(["--weights", str(shared / "weights/yolov5n.pt")]) == 0
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pt")] == ["runs/weights/yolov5n-kfyolo.pt"]
