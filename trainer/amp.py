"""Mixed precision: which autocast dtype to use and whether gradients need a scaler.

CUDA: fp16 autocast with GradScaler (fp16's narrow range needs loss scaling).
CPU: fp32 by default. `--amp bf16` autocasts the convolutions to bf16 where the CPU has native
bf16 (AMX / AVX512-BF16); bf16 keeps fp32's exponent range, so no scaler is needed. BatchNorm and
the activation after it stay in fp32 (trainer/models/blocks.py: Conv, which says what feeding BN
bf16 measured). Measured at 320 px, batch 16, 2 AMX
cores (bench/bench_train_step.py): from the official yolov5n weights the bf16 gradient's cosine to
fp64's is 0.993, while the exact gradients of two different batches have a cosine of 0.49, so the
rounding is far below SGD's own noise; a 3-epoch COCO128 fine-tune scores the same AP in bf16 and
fp32 (bench/bench_vs_yolov5.py). On a freshly initialised model the cosine drops to 0.51 (its
gradients are tiny sums that mostly cancel; two batches' exact gradients have a cosine of 0.05
there). The step runs 1.2-1.3x faster than fp32 (both channels_last). bf16 stays opt-in on CPU.
The loss is always computed in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    device_type: str
    dtype: torch.dtype | None  # None = full fp32

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """`amp` is auto, fp16, bf16 or off."""
    if amp == "off":
        return Precision(device.type, None)
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs CUDA; use --amp bf16 or off on CPU")
        return Precision("cuda", torch.float16)
    if amp == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            raise ValueError("--amp bf16: this CPU has no native bf16 support")
        return Precision(device.type, torch.bfloat16)
    if amp == "auto":
        if device.type == "cuda":
            return Precision("cuda", torch.float16)
        return Precision(device.type, None)
    raise ValueError(f"--amp must be auto, fp16, bf16 or off, got {amp!r}")
