"""Mixed precision: which autocast dtype to use and whether gradients need a scaler.

CUDA: fp16 autocast with GradScaler (fp16's narrow range needs loss scaling).
CPU: fp32 by default. `--amp bf16` autocasts to bf16 where the CPU has native bf16 (AMX /
AVX512-BF16); it keeps fp32's exponent range, so no scaler is needed. On a 2-core AMX machine it
trained yolov5n 1.5x faster, but its gradients at initialisation point noticeably away from fp32's
(cosine ~0.73 against an fp64 reference, fp32: 1.0000) and a 30-epoch synthetic run ended lower
(mAP@.5:.95 0.022 vs 0.034), so it is opt-in. The loss itself is always computed in fp32.
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
