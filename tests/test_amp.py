"""Precision choice and the accuracy of CPU bf16 autocast against fp32."""

import pytest
import torch

from trainer.amp import Precision, cpu_has_native_bf16, resolve_precision
from trainer.loss import LossGains, YoloLoss
from trainer.models.yolo import build_model


def test_auto_is_full_precision_on_cpu():
    p = resolve_precision("auto", torch.device("cpu"))
    assert p.dtype is None and p.name == "fp32" and not p.grad_scaler().is_enabled()


def test_fp16_needs_cuda():
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_bf16_on_cpu_matches_fp32_forward_and_loss_closely():
    if not cpu_has_native_bf16():
        with pytest.raises(ValueError, match="no native bf16"):
            resolve_precision("bf16", torch.device("cpu"))
        return
    p = resolve_precision("bf16", torch.device("cpu"))
    assert p.name == "bf16" and not p.grad_scaler().is_enabled()  # bf16 needs no loss scaling
    torch.manual_seed(0)
    model = build_model("yolov5n", nc=3).eval()
    x = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    loss_fn = YoloLoss(model.detect.anchors, 3, LossGains())
    with torch.no_grad():
        full = model(x)
        with p.autocast():
            half = model(x)
    assert half[0].dtype == torch.bfloat16
    loss_full = loss_fn(full, targets)[0]
    loss_half = loss_fn(half, targets)[0]  # the loss upcasts to fp32
    assert loss_half.dtype == torch.float32
    assert loss_half.item() == pytest.approx(loss_full.item(), rel=2e-2)
    decoded_full = model.detect.decode(full)
    decoded_half = model.detect.decode(half)
    assert (decoded_half[..., :4] - decoded_full[..., :4]).abs().max() < 1.0  # pixels at 64 px


def test_off_is_a_no_op_context():
    p = Precision("cpu", None)
    with p.autocast():
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float32
