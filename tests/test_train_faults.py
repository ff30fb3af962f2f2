"""Bad flags, bad data and a non-finite loss: clear errors, nothing lost."""

from __future__ import annotations


import pytest
import torch

from trainer import loss as loss_module
from trainer.checkpoint import load_checkpoint
from trainer.train import main

BASE = ["--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4", "--device", "cpu", "--workers", "0"]


def _run(tmp_path, data, *extra, name="run"):
    return main(["--data", str(data), *BASE, "--project", str(tmp_path), "--name", name, *extra])


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--rect", "--image-weights"], "--rect and --image-weights"),
    (["--hyp-override", "lr0=-1"], "'lr0' must be > 0"),
    (["--hyp-override", "lr_0=1"], "--hyp-override lr_0: unknown hyperparameter"),
    (["--imgsz", "80"], "multiple of the model's max stride 32"),
    (["--resume", "/nonexistent/last.pt"], "checkpoint not found"),
    (["--maps", "/nonexistent/maps.json"], "--maps"),
])
def test_bad_flags_exit_2_with_a_reason(tmp_path, synthetic_yaml, capsys, flags, message):
    assert _run(tmp_path, synthetic_yaml, "--epochs", "1", *flags) == 2
    assert message in capsys.readouterr().err


def test_argparse_rejects_unknown_choices(tmp_path, synthetic_yaml):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, synthetic_yaml, "--optimizer", "RMSprop")
    assert e.value.code == 2


def test_data_yaml_without_names_fails_before_any_work(tmp_path, synthetic_yaml, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"path: {synthetic_yaml.parent}\ntrain: images/train\nval: images/val\n")
    assert _run(tmp_path, bad, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "names" in err
    assert not (tmp_path / "run").exists()  # no run folder for a run that never started


def test_maps_file_must_match_the_classes(tmp_path, synthetic_yaml, capsys):
    maps = tmp_path / "maps.json"
    maps.write_text('{"maps": [0.5, 0.5]}')
    assert _run(tmp_path, synthetic_yaml, "--epochs", "1", "--maps", str(maps)) == 2
    assert "expected a list of 6 per-class values" in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_last_good(tmp_path, synthetic_yaml, monkeypatch, capsys):
    """Epoch 0 trains normally; the loss turns NaN in epoch 1 (as with a diverging lr)."""
    real_call = loss_module.YoloLoss.__call__
    calls = {"n": 0}

    def poisoned(self, preds, targets):
        loss, parts = real_call(self, preds, targets)
        if torch.is_grad_enabled():  # training batches only, not validation
            calls["n"] += 1
            if calls["n"] > 6:  # 24 images / batch 4 = 6 batches in epoch 0
                loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(loss_module.YoloLoss, "__call__", poisoned)
    assert _run(tmp_path, synthetic_yaml, "--epochs", "3") == 1
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1, batch 0" in err and "last.pt" in err
    ck = load_checkpoint(tmp_path / "run" / "weights" / "last.pt")
    assert ck["epoch"] == 0  # the last good epoch
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_resume_rejects_a_different_cfg_and_a_finished_run(tmp_path, synthetic_yaml, capsys):
    assert _run(tmp_path, synthetic_yaml, "--epochs", "2", "--stop-epoch", "1") == 0
    last = tmp_path / "run" / "weights" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 0
    assert main(["--resume", str(last), "--cfg", "yolov5s"]) == 2
    assert "--cfg yolov5s differs from the checkpoint's 'yolov5n'" in capsys.readouterr().err
    assert main(["--resume", str(last), "--workers", "0"]) == 0
    assert load_checkpoint(last)["epoch"] == 1
    assert main(["--resume", str(last)]) == 2
    assert "already finished all 2 epochs" in capsys.readouterr().err


def test_corrupt_checkpoint_on_resume(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["--resume", str(bad)]) == 2
    assert "last.pt: unreadable checkpoint" in capsys.readouterr().err


def _dataset(root, train_images: list[tuple[bytes | None, str | None]], names=("a", "b")):
    """A data YAML whose train split holds the given (image bytes or None for a real PNG, label text)."""
    import cv2
    import numpy as np

    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    png = cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
    for k, (data, label) in enumerate(train_images):
        (root / "images" / "train" / f"{k}.png").write_bytes(png if data is None else data)
        if label is not None:
            (root / "labels" / "train" / f"{k}.txt").write_text(label)
    (root / "images" / "val" / "v.png").write_bytes(png)
    (root / "labels" / "val" / "v.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {list(names)}\n")
    return yaml


def test_every_image_bad_writes_the_report_into_the_run_folder(tmp_path, capsys):
    data = _dataset(tmp_path / "d", [(b"not a png", "0 0.5 0.5 0.2 0.2\n"), (None, "7 0.5 0.5 0.2 0.2\n")])
    assert _run(tmp_path, data, "--epochs", "1", name="bad") == 2
    assert "none of 2 images survived validation" in capsys.readouterr().err
    import json

    report = json.loads((tmp_path / "bad" / "dataset_report.json").read_text())["train"]
    assert report["n_found"] == 2 and report["n_kept"] == 0 and len(report["rejected"]) == 2
    text = json.dumps(report["rejected"])
    assert "0.png" in text and "1.png" in text  # each rejected image is listed with its reason


def test_an_empty_images_folder_is_named(tmp_path, capsys):
    data = _dataset(tmp_path / "d", [])
    assert _run(tmp_path, data, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "split 'train' (" in err and "images/train) holds no images" in err


def test_a_training_split_without_labels_is_refused(tmp_path, capsys):
    data = _dataset(tmp_path / "d", [(None, None), (None, "")])
    assert _run(tmp_path, data, "--epochs", "1") == 2
    assert "the training split has no labels (all 2 images are backgrounds)" in capsys.readouterr().err


def test_all_zero_image_weights_warn(tmp_path, synthetic_yaml, capfd):
    import json

    names = ["circle", "square", "triangle", "cross", "star", "hexagon"]
    maps = tmp_path / "maps.json"
    maps.write_text(json.dumps({"names": names, "maps": [1.0] * 6}))
    assert _run(tmp_path, synthetic_yaml, "--epochs", "1", "--image-weights", "--maps", str(maps), "--noval") == 0
    assert "epoch 0: every image weight is zero" in capfd.readouterr().err
