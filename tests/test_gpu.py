"""CUDA checks: fp16 autocast with GradScaler through the real epoch loop (skipped without CUDA), and the
same epoch check on CPU so its counting is shown to fail when the weights do not move."""

from __future__ import annotations

import pytest
import torch

from trainer import distributed
from trainer.amp import resolve_precision
from trainer.config import TrainOptions
from trainer.engine import StepCounter, train_one_epoch
from trainer.fit import epoch_plan, setup


def _one_epoch_moves_parameters(tmp_path, synthetic_yaml, device: str, amp: str):
    """One epoch through the real loop; returns the run and how many parameters (not buffers) moved."""
    import random

    opt = TrainOptions(data=str(synthetic_yaml), cfg="yolov5n", imgsz=64, batch_size=8, device=device, workers=2,
                       project=str(tmp_path), epochs=1, amp=amp)
    run = setup(opt, distributed.DistContext(), distributed.select_device(device))
    try:
        # parameters only: BatchNorm's running statistics change on any forward pass, trained or not
        before = {k: v.detach().clone() for k, v in run.model.named_parameters()}
        counter = StepCounter(-1, run.state.accumulate)
        stats = train_one_epoch(run.model, run.loss_fn, run.optimizer, run.scaler, run.ema, run.train_loader,
                                epoch_plan(run, 0), counter, run.precision, run.device, random.Random(0), run.logger)
        assert torch.isfinite(torch.tensor(list(stats.values()))).all()
        changed = [k for k, v in run.model.named_parameters() if not torch.equal(v.detach(), before[k])]
        return run, len(changed), len(before)
    finally:
        run.logger.close()


def test_one_fp32_epoch_on_cpu_updates_weights(tmp_path, synthetic_yaml):
    """The CUDA test's counting, on CPU: it fails when the optimizer step does not move the weights."""
    _, changed, total = _one_epoch_moves_parameters(tmp_path, synthetic_yaml, "cpu", "off")
    assert changed > total // 2, f"only {changed} of {total} parameters moved in an fp32 epoch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_precision_is_fp16_with_a_scaler_on_cuda():
    p = resolve_precision("auto", torch.device("cuda", 0))
    assert p.dtype == torch.float16 and p.grad_scaler().is_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_fp16_epoch_on_cuda_updates_weights(tmp_path, synthetic_yaml):
    run, changed, total = _one_epoch_moves_parameters(tmp_path, synthetic_yaml, "0", "auto")
    assert run.precision.name == "fp16" and run.scaler.is_enabled()
    assert changed > total // 2, f"only {changed} of {total} parameters moved in an fp16 epoch"
    assert 0 < run.scaler.get_scale() < 2**24
