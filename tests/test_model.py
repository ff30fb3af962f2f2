"""The YOLOv5 model built from YAML against official figures and the official yolov5n checkpoint."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from trainer.data.augment import letterbox
from trainer.models.blocks import Detect
from trainer.models.foreign_pickle import read_ultralytics_checkpoint
from trainer.models.pretrained import load_matching, read_weights
from trainer.models.yolo import (ModelConfigError, YoloModel, build_layers, build_model, load_model_spec,
                                 model_spec_from_dict, summarise)
from trainer.ops.boxes import box_iou, scale_boxes_to_original, xywhn2xyxy
from trainer.ops.nms import non_max_suppression

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
COCO128 = SHARED / "datasets" / "coco128"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"{WEIGHTS} absent (shared folder not mounted)")

# Parameter counts of the official ultralytics v6/v7 models at nc=80.
OFFICIAL_PARAMS = {"yolov5n": 1_872_157, "yolov5s": 7_235_389, "yolov5m": 21_190_557,
                   "yolov5l": 46_563_709, "yolov5x": 86_749_405}
YAML_ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def _yaml_anchors_in_grid_units() -> torch.Tensor:
    """(3, 3, 2): each level's pixel anchors divided by its stride 8, 16, 32."""
    return torch.tensor(YAML_ANCHORS_PX, dtype=torch.float32).view(3, 3, 2) / torch.tensor([8.0, 16.0, 32.0]).view(3, 1, 1)


@pytest.fixture(scope="module")
def yolov5n() -> YoloModel:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    return build_model("yolov5n").eval()


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_match_official(name: str) -> None:
    # Built on the meta device: the same layers, without allocating or initialising l/x weights.
    with torch.device("meta"):
        layers, _, _ = build_layers(load_model_spec(name))
    assert sum(p.numel() for layer in layers for p in layer.parameters()) == OFFICIAL_PARAMS[name]


def test_full_model_parameter_count(yolov5n: YoloModel) -> None:
    assert sum(p.numel() for p in yolov5n.parameters()) == OFFICIAL_PARAMS["yolov5n"]
    assert yolov5n.nc == 80 and len(yolov5n.names) == 80


@needs_weights
def test_state_dict_matches_official_checkpoint(yolov5n: YoloModel) -> None:
    official = read_ultralytics_checkpoint(WEIGHTS).state_dict
    ours = yolov5n.state_dict()
    assert list(ours) == list(official)  # same keys, same order
    for key, value in official.items():
        assert ours[key].shape == value.shape, key


@needs_weights
def test_model_from_checkpoint_yaml() -> None:
    # The ultralytics YAML spells Upsample as 'nn.Upsample' with a 'None' string argument.
    spec = model_spec_from_dict(read_ultralytics_checkpoint(WEIGHTS).yaml, name="yolov5n")
    model = build_model(spec)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS["yolov5n"]


def test_strides_and_anchors_in_grid_units(yolov5n: YoloModel) -> None:
    assert yolov5n.stride.tolist() == [8.0, 16.0, 32.0]
    expected = _yaml_anchors_in_grid_units()
    torch.testing.assert_close(yolov5n.detect.anchors, expected)
    assert yolov5n.detect.anchors[0, 0].tolist() == [1.25, 1.625]  # 10/8, 13/8


def test_anchors_listed_large_first_are_flipped() -> None:
    d = load_model_spec("yolov5n").to_dict()
    d["anchors"] = d["anchors"][::-1]
    model = build_model(d)
    expected = _yaml_anchors_in_grid_units()
    torch.testing.assert_close(model.detect.anchors, expected)


def test_forward_and_predict_shapes(yolov5n: YoloModel) -> None:
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        raw = yolov5n(x)
        det = yolov5n.predict(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 64 // s, 96 // s, 85) for s in (8, 16, 32)]
    n = 3 * sum((64 // s) * (96 // s) for s in (8, 16, 32))
    assert det.shape == (2, n, 85)
    assert ((det[..., 4:] >= 0) & (det[..., 4:] <= 1)).all()  # sigmoid obj and class scores


def test_decode_zero_logits_by_hand() -> None:
    # Zero logits: sigmoid 0.5 -> centre = (cell + 0.5) * stride, size = anchor in pixels.
    torch.manual_seed(0)
    detect = Detect(nc=2, anchors=[[2.0, 3.0, 4.0, 5.0]], ch=[4])  # one level, anchors already in grid units
    detect.stride.fill_(8.0)
    raw = torch.zeros(1, 2, 2, 3, 7)  # (B, na, H, W, 5 + nc)
    out = detect.decode([raw])
    assert out.shape == (1, 12, 7)
    rows = out.view(2, 2, 3, 7)
    assert rows[0, 1, 2].tolist() == pytest.approx([(2 + 0.5) * 8, (1 + 0.5) * 8, 16.0, 24.0, 0.5, 0.5, 0.5])
    assert rows[1, 0, 0, :4].tolist() == pytest.approx([4.0, 4.0, 32.0, 40.0])
    # Grids are cached per size, stride and anchors: another size, then a new stride and new
    # anchors on the same module, must each decode afresh.
    rows = detect.decode([torch.zeros(1, 2, 3, 1, 7)]).view(2, 3, 1, 7)
    assert rows[0, 2, 0, :4].tolist() == pytest.approx([0.5 * 8, 2.5 * 8, 16.0, 24.0])
    detect.stride.fill_(16.0)
    detect.anchors.mul_(2)
    rows = detect.decode([raw]).view(2, 2, 3, 7)
    assert rows[1, 1, 2, :4].tolist() == pytest.approx([2.5 * 16, 1.5 * 16, 8 * 16, 10 * 16])


def test_detect_bias_initialisation() -> None:
    spec = load_model_spec("yolov5n", nc=5)
    torch.manual_seed(123)
    layers, _, _ = build_layers(spec)  # same modules, same RNG draws, no bias init
    raw_biases = [conv.bias.detach().clone().view(3, 10) for conv in layers[-1].m]
    torch.manual_seed(123)
    model = YoloModel(spec)
    for conv, raw, s in zip(model.detect.m, raw_biases, (8, 16, 32)):
        delta = conv.bias.detach().view(3, 10) - raw  # (na, 5 + nc)
        torch.testing.assert_close(delta[:, :4], torch.zeros(3, 4))
        torch.testing.assert_close(delta[:, 4], torch.full((3,), math.log(8 / (640 / s) ** 2)))
        torch.testing.assert_close(delta[:, 5:], torch.full((3, 5), math.log(0.6 / (5 - 0.99999))))


def test_summarise_gflops(yolov5n: YoloModel) -> None:
    n = summarise(yolov5n)
    assert n.parameters == n.gradients == OFFICIAL_PARAMS["yolov5n"]
    assert 4.0 <= n.gflops <= 5.0
    s = summarise(build_model("yolov5s"))
    assert 15.5 <= s.gflops <= 17.0
    assert "GFLOPs" in str(s)


@pytest.mark.parametrize("name", ["yolov5n", "yolov5s"])
def test_conv_flops_equal_torch_flop_counter_and_leave_the_model_as_it_was(name: str) -> None:
    """The hook count equals torch's FlopCounterMode on the same probe; the live model (in train
    mode, with one frozen BatchNorm in eval mode) keeps its modes and its BatchNorm statistics."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from trainer.models.yolo import _convolutions_only, _counted_flops, conv_flops

    model = build_model(name, nc=7).train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()
    before = copy.deepcopy(model.state_dict())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        copy.deepcopy(model).eval()(torch.zeros(1, 3, 64, 64))
    assert _convolutions_only(model)
    assert conv_flops(model, 64) == counter.get_total_flops() == _counted_flops(model, 64) > 0
    assert model.training and not frozen.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.model.append(torch.nn.Linear(4, 4))  # a layer the hooks do not count: the counter decides
    assert not _convolutions_only(model)


@pytest.mark.skipif(not (WEIGHTS.is_file() and COCO128.is_dir()), reason="shared weights or coco128 absent")
def test_official_weights_detect_bowls_and_broccoli() -> None:
    torch.set_num_threads(2)
    model = build_model("yolov5n")
    report = load_matching(model, read_weights(WEIGHTS))
    assert len(report.loaded) == 349 and not report.shape_mismatch and not report.missing
    model.eval()
    img0 = cv2.imread(str(COCO128 / "images" / "train2017" / "000000000009.jpg"))
    h0, w0 = img0.shape[:2]
    img, (rw, rh), pad = letterbox(img0, 640)
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)))[None].float() / 255
    with torch.no_grad():
        (det,) = non_max_suppression(model.predict(x), conf_thres=0.25, iou_thres=0.45)
    labels = np.loadtxt(COCO128 / "labels" / "train2017" / "000000000009.txt", ndmin=2)
    gt = torch.tensor(xywhn2xyxy(labels[:, 1:], w0, h0), dtype=torch.float32)
    boxes = scale_boxes_to_original(det[:, :4].clone(), ((rh, rw), pad), (h0, w0))
    iou = box_iou(boxes, gt)  # (n_det, n_gt)
    for cls in (45, 50):  # bowl, broccoli: a detection of that class overlaps a box of that class
        same = (det[:, 5, None] == cls) & torch.from_numpy(labels[:, 0] == cls)[None]
        assert (iou * same).max() > 0.5, f"no class {cls} detection matches its label"


def test_fused_copy_matches_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = build_model("yolov5n", nc=3)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # statistics far from the identity, so a wrong fold shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = model.fused()
    assert model.training and not fused.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.rand(2, 3, 96, 128, generator=g)
    with torch.no_grad():
        want, got = model.eval().predict(x), fused.predict(x)
    assert (want - got).abs().max() < 1e-3 * want.abs().max()


def test_channels_last_head_is_a_view_with_the_same_values_and_gradients() -> None:
    """channels_last: Detect returns (B, na, H, W, no) as a strided view of the conv output (no copy);
    values and parameter gradients equal the contiguous model's."""
    from trainer.config import Hyp
    from trainer.loss import YoloLoss, scale_loss_gains

    torch.manual_seed(0)
    ref = build_model("yolov5n", nc=3).train()
    nhwc = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 96)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    loss_fn = YoloLoss(ref.detect.anchors, 3, scale_loss_gains(Hyp().to_dict(), 3, 3, 64))
    outs, grads = [], []
    for model in (ref, nhwc):
        raw = model(x)
        loss_fn(raw, targets)[0].backward()
        outs.append(raw)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for a, b in zip(*outs):
        assert a.shape == b.shape and a.is_contiguous() and not b.is_contiguous()
        assert (a - b).abs().max() < 1e-3  # the two layouts use different conv kernels
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.9999
    assert torch.allclose(ref.detect.decode([o.detach() for o in outs[0]]),
                          nhwc.detect.decode([o.detach() for o in outs[1]]), rtol=1e-3, atol=1e-2)


def _spec_dict() -> dict:
    return copy.deepcopy(load_model_spec("yolov5n").to_dict())


def test_bad_yaml_unknown_module() -> None:
    d = _spec_dict()
    d["backbone"][1][2] = "Focus2"
    with pytest.raises(ModelConfigError, match="unknown module 'Focus2'"):
        build_model(d)


def test_bad_yaml_missing_key() -> None:
    d = _spec_dict()
    del d["head"]
    with pytest.raises(ModelConfigError, match=r"missing keys \['head'\]"):
        build_model(d)


def test_bad_yaml_from_index() -> None:
    d = _spec_dict()
    d["head"][2][0] = [-1, 30]  # Concat of layer 12 with a layer that comes later
    with pytest.raises(ModelConfigError, match="layer 12 takes input from invalid layer 30"):
        build_model(d)


def test_bad_yaml_last_layer_not_detect() -> None:
    d = _spec_dict()
    d["head"] = d["head"][:-1]
    with pytest.raises(ModelConfigError, match="last layer must be Detect"):
        build_model(d)


def test_bad_yaml_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("nc: 2\ndepth_multiple: 1.0\nwidth_multiple: 1.0\nanchors: 3\nbackbone: []\nhead: []\n")
    with pytest.raises(ModelConfigError, match=f"{path}.*anchors"):
        load_model_spec(path)


def test_unknown_model_name() -> None:
    with pytest.raises(ModelConfigError, match="nope.*neither a file nor one of.*yolov5n"):
        load_model_spec("nope")


def test_names_must_match_nc() -> None:
    with pytest.raises(ModelConfigError, match="2 names for nc=3"):
        build_model("yolov5n", nc=3, names=["a", "b"])
    model = build_model("yolov5n", names=["cat", "dog"])
    assert model.nc == 2 and model.detect.m[0].out_channels == 3 * 7


@pytest.mark.parametrize("text, where, what", [
    ("nc: 3\nbackbone: [[-1, 1, Conv, [16, 3]]\nhead: x\n", ":3:", "expected ',' or ']'"),
    ('nc: !!python/object/apply:os.system ["echo hi"]\n', ":1:", "python/object/apply:os.system"),
    ("- just\n- a list\n", "", "must be a mapping"),
])
def test_a_broken_cfg_yaml_names_the_file_and_line(tmp_path: Path, text: str, where: str, what: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ModelConfigError) as e:
        load_model_spec(bad)
    assert str(e.value).startswith(f"{bad}{where}") and what in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("module", ["train", "evaluate", "export_weights", "report", "predict", "export"])
def test_every_cli_has_a_version_flag(module: str, capsys) -> None:
    import importlib

    from trainer import __version__

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"trainer.{module}").main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"kfyolo {__version__}"


def test_version_from_the_command_line() -> None:
    import subprocess
    import sys

    from trainer import __version__

    out = subprocess.run([sys.executable, "-m", "trainer.train", "--version"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"kfyolo {__version__}"
