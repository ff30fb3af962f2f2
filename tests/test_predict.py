"""trainer.predict: evaluate's detections on COCO128, outputs that round-trip, sources, and bad images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from trainer.evaluate import EvalOptions, evaluate
from trainer.inference.preprocess import ImageError, rect_shape
from trainer.inference.sources import SourceError, expand_source
from trainer.predict import Predictor, main

# Landscape and portrait COCO128 images (480x640, 426x640, 640x481, 500x381).
IMAGES = ("000000000009.jpg", "000000000025.jpg", "000000000036.jpg", "000000000049.jpg")


@pytest.fixture(scope="module")
def coco(shared) -> tuple[Path, list[Path]]:
    folder = shared / "datasets/coco128/images/train2017"
    return shared / "weights/yolov5n.pt", [folder / name for name in IMAGES]


def _by_file(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), axis=1)


def test_predict_gives_evaluates_detections(coco, shared, tmp_path):
    """Same images, thresholds and multi-label NMS: predict's boxes are evaluate's (--batch-size 1: each
    image gets the rect shape of a batch of its own, which is what predict uses)."""
    weights, images = coco
    listing = tmp_path / "four.txt"
    listing.write_text("\n".join(map(str, images)) + "\n")
    names = yaml.safe_load((shared / "datasets/coco128/coco128.yaml").read_text())["names"]
    data = tmp_path / "four.yaml"
    data.write_text(yaml.safe_dump({"path": str(images[0].parents[2]), "train": str(listing), "val": str(listing),
                                    "names": names}))
    evaluate(EvalOptions(data=str(data), weights=str(weights), imgsz=320, batch_size=1, conf_thres=0.1, iou_thres=0.6,
                         device="cpu", save_json=True, workers=0, plots=False, project=str(tmp_path), name="ev"))
    theirs = _by_file(json.loads((tmp_path / "ev/predictions.json").read_text()), "image_id")
    ours = Predictor(weights, imgsz=320, conf_thres=0.1, iou_thres=0.6, multi_label=True, device="cpu").predict(images)
    assert sum(len(d) for d in ours) == sum(len(v) for v in theirs.values()) > 20
    for det in ours:
        rows = theirs.get(int(Path(det.name).stem), [])
        assert [r["category_id"] for r in rows] == det.classes.tolist(), det.name
        np.testing.assert_allclose([r["bbox"] for r in rows], _xywh(det.boxes), atol=1e-4)  # JSON keeps 4 decimals
        np.testing.assert_allclose([r["score"] for r in rows], det.scores, atol=1e-6)


def test_cli_outputs_round_trip_and_a_corrupt_image_is_skipped(coco, tmp_path, capsys):
    weights, images = coco
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for p in images[:2]:
        shutil.copy(p, folder)
    shutil.copy(images[2], folder / "sub")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    code = main(["--weights", str(weights), "--source", str(folder), "--imgsz", "320", "--save-conf", "--device", "cpu",
                 "--batch-size", "2", "--project", str(tmp_path / "runs")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [ln for ln in captured.err.splitlines() if "broken.jpg" in ln] == [
        f"skipped {folder / 'broken.jpg'}: not a readable image (corrupt, empty or a format OpenCV cannot decode)"]
    assert "3 images" in captured.out and "1 skipped" in captured.out
    run = tmp_path / "runs/exp"
    assert (run / "skipped.txt").read_text().startswith(str(folder / "broken.jpg"))
    good = [folder / IMAGES[0], folder / IMAGES[1], folder / "sub" / IMAGES[2]]  # the folder's order
    dets = Predictor(weights, imgsz=320, device="cpu", batch_size=2).predict(good)
    rows = _by_file(json.loads((run / "predictions.json").read_text()), "file_name")
    assert sum(len(d) for d in dets) > 5
    for det in dets:
        stem = Path(det.name).stem
        h, w = det.shape
        table = np.loadtxt(run / "labels" / f"{stem}.txt", ndmin=2).reshape(-1, 6)  # cls cx cy w h conf
        assert table[:, 0].astype(int).tolist() == det.classes.tolist()
        xywh = _xywh(det.boxes)
        centre = np.concatenate((xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]), axis=1) / [w, h, w, h]
        np.testing.assert_allclose(table[:, 1:5], centre, atol=1e-6)
        np.testing.assert_allclose(table[:, 5], det.scores, atol=1e-6)
        mine = rows.get(f"{stem}.jpg", [])
        assert {r["image_id"] for r in mine} <= {int(stem)}
        assert [r["category_id"] for r in mine] == det.classes.tolist()
        np.testing.assert_allclose([r["bbox"] for r in mine], xywh, atol=1e-4)
        np.testing.assert_allclose([r["score"] for r in mine], det.scores, atol=1e-6)
        assert cv2.imread(str(run / f"{stem}.jpg")).shape[:2] == (h, w)  # annotated, at the original size


def test_letterbox_shape_is_a_validation_batch_of_one(coco):
    from trainer.data.dataset import YoloDataset

    _, images = coco
    for path in images:
        ds = YoloDataset([path], img_size=320, batch_size=1, rect=True, stride=32, pad=0.5, names=["x"] * 80)
        h, w = cv2.imread(str(path)).shape[:2]
        assert tuple(ds.batch_shapes[0]) == rect_shape(h, w, 320, 32)
        item = ds[0][0].numpy()  # (3, H, W) RGB uint8, what evaluate feeds the model
        p = Predictor.__new__(Predictor)  # only the preprocessing: no model needed
        p.imgsz, p.stride, p.session = 320, 32, type("S", (), {"fixed_hw": None})()
        assert np.array_equal(p.preprocess(cv2.imread(str(path))).chw, item)


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, (48 + 16 * i, 64, 3), dtype=np.uint8))
    return paths


def test_sources_glob_list_and_s3(tiny_weights, tmp_path, s3, capsys):
    from trainer.storage import Storage

    paths = _images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "notes.md").write_text("not an image")
    assert [i.name for i in expand_source(str(tmp_path / "imgs" / "img[02].png"))] == [str(paths[0]), str(paths[2])]
    listing = tmp_path / "list.txt"
    listing.write_text(f"imgs/{paths[1].name}\nimgs/missing.png\n")  # relative to the list's folder
    assert [i.name for i in expand_source(str(listing))] == [str(paths[1]), str(tmp_path / "imgs/missing.png")]
    storage = Storage.from_env()
    storage.upload_dir(tmp_path / "imgs", "s3://kfyolo/incoming")
    items = expand_source("s3://kfyolo/incoming/")
    assert [i.name for i in items] == [f"s3://kfyolo/incoming/img{i}.png" for i in range(3)]
    code = main(["--weights", str(tiny_weights), "--source", "s3://kfyolo/incoming", str(listing), "--imgsz", "64",
                 "--conf-thres", "0.001", "--device", "cpu", "--project", str(tmp_path / "runs")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4 images" in captured.out and "1 skipped" in captured.out and "missing.png: file not found" in captured.err
    # img1 came twice (S3 and the list): the second copy is written as img1_2
    assert sorted(p.name for p in (tmp_path / "runs/exp/labels").iterdir()) == ["img0.txt", "img1.txt", "img1_2.txt",
                                                                                "img2.txt"]


def test_api_takes_arrays_and_filters_classes(tiny_weights, tmp_path):
    rng = np.random.default_rng(0)
    colour, grey = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (70, 50), dtype=np.uint8)
    p = Predictor(tiny_weights, imgsz=64, conf_thres=0.001, device="cpu", classes=["blue", 0])
    dets = p.predict([colour, grey])
    assert [d.name for d in dets] == ["image0", "image1"] and [d.shape for d in dets] == [(50, 70), (70, 50)]
    assert sum(len(d) for d in dets) > 0 and {c for d in dets for c in d.labels} <= {"red", "blue"}
    for d in dets:
        assert d.boxes.dtype == np.float32 and (d.boxes[:, [0, 2]] <= d.shape[1]).all() and (d.boxes >= 0).all()
    with pytest.raises(ImageError, match="image 0: expected an \\(H, W, 3\\) BGR image"):
        p.predict(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="--classes purple"):
        Predictor(tiny_weights, imgsz=64, device="cpu", classes=["purple"])


def test_bad_sources_and_weights_are_one_line_errors(tiny_weights, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for source, message in ((tmp_path / "nope", "no such file or folder"), (tmp_path / "empty", "no images in it"),
                            (tmp_path / "*.jpg", "the pattern matches no image")):
        assert main(["--weights", str(tiny_weights), "--source", str(source), "--project", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --source {source}: {message}") and err.count("\n") == 1
    with pytest.raises(SourceError, match="not an image"):
        expand_source(str(tiny_weights))
    _images(tmp_path / "one", 1)
    assert main(["--weights", str(tmp_path / "missing.onnx"), "--source", str(tmp_path / "one")]) == 2
    assert "missing.onnx: file not found" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["--weights", str(tiny_weights), "--source", str(tmp_path / "bad"), "--imgsz", "64",
                 "--project", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "a.jpg: truncated JPEG" in err and "no image of --source" in err
