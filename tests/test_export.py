"""trainer.export: ONNX and TorchScript files that match the PyTorch model, with their metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.export import BOX_RTOL, SCORE_ATOL, ExportOptions, check_parity, export, main, same_detections
from trainer.inference.metadata import METADATA_KEY
from trainer.inference.sources import read_local
from trainer.predict import Predictor

IMAGES = ("000000000009.jpg", "000000000025.jpg", "000000000036.jpg", "000000000049.jpg")


@pytest.fixture(scope="module")
def coco(shared) -> tuple[Path, list[Path]]:
    folder = shared / "datasets/coco128/images/train2017"
    return shared / "weights/yolov5n.pt", [folder / name for name in IMAGES]


@pytest.fixture(scope="module")
def onnx_export(coco, tmp_path_factory):
    weights, images = coco
    listing = tmp_path_factory.mktemp("check") / "four.txt"
    listing.write_text("\n".join(map(str, images)) + "\n")
    out = tmp_path_factory.mktemp("onnx") / "yolov5n.onnx"
    return export(ExportOptions(weights=str(weights), out=str(out), imgsz=320, check_source=str(listing)))


def test_onnx_raw_outputs_and_detections_match_torch(coco, onnx_export):
    weights, images = coco
    path, meta, parity = onnx_export
    assert parity.ok and parity.images == 4 and parity.detections > 5 and not parity.mismatched
    assert parity.box_tolerance == pytest.approx(BOX_RTOL * 352)  # the widest input: 480 x 640 -> 256 x 352
    assert parity.max_abs_box <= parity.box_tolerance and parity.max_abs_score <= SCORE_ATOL
    # Independently: a batch of two (dynamic batch) at another size than the export's (dynamic size).
    torch_p, onnx_p = (Predictor(w, imgsz=416, device="cpu", batch_size=2) for w in (weights, path))
    assert onnx_p.session.kind == "onnx" and onnx_p.names == torch_p.names
    pair = (images[1], images[1].with_name("000000000030.jpg"))  # 426 x 640 and 428 x 640: both (3, 320, 448)
    batch = np.stack([torch_p.preprocess(read_local(p)).chw for p in pair])
    ref, out = torch_p.session(batch), onnx_p.session(batch)
    assert out.shape == ref.shape == (2, 3 * (40 * 56 + 20 * 28 + 10 * 14), 85)
    assert (ref - out)[..., :4].abs().max() <= BOX_RTOL * 448 and (ref - out)[..., 4:].abs().max() <= SCORE_ATOL
    a, b = torch_p.predict(images), onnx_p.predict(images)
    assert sum(map(len, a)) > 5 and all(same_detections(x, y) for x, y in zip(a, b))


def test_onnx_metadata_beside_and_inside(onnx_export):
    import onnx

    path, meta, _ = onnx_export
    beside = json.loads(path.with_suffix(".json").read_text())
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props[METADATA_KEY]) == beside == meta.to_dict()
    assert len(beside["names"]) == 80 and beside["names"][0] == "person" and beside["stride"] == 32
    assert beside["imgsz"] == 320 and beside["batch"] is None and beside["input_hw"] is None and beside["opset"] == 17
    assert beside["input"]["layout"] == "NCHW" and beside["output"]["shape"] == ["batch", "anchors", 85]
    assert beside["kfyolo_version"] and beside["parity"]["ok"] and beside["fused"]
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["predictions"]
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)  # Conv+BN fused


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_reloads_and_gives_the_same_detections(coco, tmp_path):
    weights, images = coco
    out = tmp_path / "yolov5n.torchscript"
    path, _, parity = export(ExportOptions(weights=str(weights), format="torchscript", out=str(out), imgsz=320,
                                           check_source=str(images[0])))
    assert parity.ok and parity.runtime == "torchscript"
    extra = {f"{METADATA_KEY}.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra[f"{METADATA_KEY}.json"])["format"] == "torchscript"
    torch_p, ts_p = (Predictor(w, imgsz=320, device="cpu") for w in (weights, path))
    x = torch.from_numpy(torch_p.preprocess(read_local(images[2])).chw[None]).float() / 255  # portrait 640 x 481: (1, 3, 352, 288)
    with torch.no_grad():
        assert (module(x) - torch_p.session.net.predict(x)).abs().max() <= BOX_RTOL * 352
    a, b = torch_p.predict(images), ts_p.predict(images)
    assert sum(map(len, a)) > 5 and all(same_detections(x, y) for x, y in zip(a, b))


def test_fixed_batch_and_size(tiny_weights, synthetic_yaml, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "static.onnx"
    path, meta, parity = export(ExportOptions(weights=str(tiny_weights), out=str(out), imgsz=64, batch_size=2,
                                              dynamic_batch=False, dynamic_size=False, data=str(synthetic_yaml),
                                              check_images=3, conf_thres=0.001))
    assert parity.ok and parity.detections > 0 and meta.batch == 2 and meta.input_hw == (64, 64)
    assert ort.InferenceSession(str(path)).get_inputs()[0].shape == [2, 3, 64, 64]
    p = Predictor(path, imgsz=32, conf_thres=0.001, batch_size=3, device="cpu")  # fixed size wins over --imgsz
    assert p.imgsz == 64
    frames = sorted((synthetic_yaml.parent / "images/val").iterdir())[:5]
    assert len(p.predict(frames)) == 5  # batches of 3 run as chunks of 2, the last one padded


def test_the_parity_check_catches_another_model(tiny_weights, tmp_path):
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    from trainer.checkpoint import save_checkpoint
    from trainer.models.yolo import build_model

    model = build_model("yolov5n", names=["red", "green", "blue"])
    save_checkpoint({"model": model.state_dict(), "spec": model.spec.to_dict(), "names": model.names}, other)
    path, _, _ = export(ExportOptions(weights=str(tiny_weights), out=str(tmp_path / "tiny.onnx"), imgsz=64))
    frame = ("noise", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    report = check_parity(Predictor(other, imgsz=64, conf_thres=0.001, device="cpu"),
                          Predictor(path, imgsz=64, conf_thres=0.001, device="cpu"), [frame])
    assert not report.ok and report.max_abs_box > report.box_tolerance and report.mismatched == ("noise",)


def test_bad_options_are_one_line_errors(tiny_weights, tmp_path, capsys):
    w = str(tiny_weights)
    for args, message in ((["--imgsz", "100"], "must be a positive multiple of the model's max stride 32"),
                          (["--opset", "9"], "--opset 9: the exporter supports 11-20"),
                          (["--out", str(tmp_path / "m.onnx"), "--format", "torchscript"], "must end in .torchscript"),
                          (["--check-source", str(tmp_path / "none")], "no such file or folder")):
        assert main(["--weights", w, *args]) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], errors
    assert main(["--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "file not found" in capsys.readouterr().err
