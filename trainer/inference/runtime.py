"""Runtime sessions: a (B, 3, H, W) uint8 RGB batch in, (B, N, 5 + nc) decoded predictions out.

One mechanism, three runtimes. Letterboxing before and NMS after are shared (`trainer.predict`);
only building the session and running it differ:

- `TorchSession`: a kfyolo checkpoint or an official ultralytics `.pt` (read without executing its
  pickle), run as the Conv+BN-fused copy `trainer.validate` runs, same autocast and memory format;
- `TorchScriptSession`: a `.torchscript` file from `python -m trainer.export --format torchscript`;
- `OnnxSession`: an `.onnx` file run by ONNX Runtime: no PyTorch model is built or run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from trainer.amp import Precision, resolve_precision
from trainer.fit import memory_format as memory_format_of
from trainer.inference.metadata import INPUT_NAME, METADATA_KEY, OUTPUT_NAME, ModelMetadata, read_metadata
from trainer.models.pretrained import model_from_weights


class RuntimeSetupError(ValueError):
    """A model file or runtime option that cannot be used; the message names the file."""


class Session(Protocol):
    kind: str  # torch, torchscript or onnx
    names: tuple[str, ...]
    stride: int  # input sides must be multiples of it
    fixed_hw: tuple[int, int] | None  # the input size of a model exported without a dynamic size
    device: torch.device

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB -> (B, N, 5 + nc) float32: xywh input pixels, obj, class probabilities."""
        ...


class TorchSession:
    """A checkpoint's model, fused, as `trainer.validate.accumulate` runs it."""

    kind = "torch"
    fixed_hw = None

    def __init__(self, weights: str | Path, device: torch.device, precision: Precision,
                 memory_format: str = "channels_last"):
        model, self.source = model_from_weights(weights)
        self.names = tuple(model.names)
        self.stride = max(int(model.stride.max()), 32)  # as trainer.evaluate
        self.device, self.precision = device, precision
        # The order evaluate uses (move, then fuse), so the folded weights are the same numbers.
        self.net = model.to(device, memory_format=memory_format_of(memory_format)).eval().fused()

    @torch.no_grad()
    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True).float() / 255  # (B, 3, H, W) in [0, 1]
        with self.precision.autocast():
            raw = self.net(x)  # nl x (B, na, h, w, 5 + nc) logits
        return self.net.detect.decode([r.float() for r in raw])


class TorchScriptSession:
    """A traced model from `trainer.export`; its metadata travels inside the archive."""

    kind = "torchscript"

    def __init__(self, path: str | Path, device: torch.device):
        extra = {f"{METADATA_KEY}.json": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; its files still load
                self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except RuntimeError as e:
            raise RuntimeSetupError(f"{path}: not a TorchScript archive ({str(e).splitlines()[0]})") from e
        self.meta = read_metadata(extra[f"{METADATA_KEY}.json"], path)
        self.names, self.stride, self.device = self.meta.names, self.meta.stride, device
        self.fixed_hw = self.meta.input_hw

    @torch.no_grad()
    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).to(self.device).float() / 255
        return self.module(x).float()


class OnnxSession:
    """An exported model run by ONNX Runtime. A fixed batch size is served by padding the last chunk."""

    kind = "onnx"

    def __init__(self, path: str | Path, device: torch.device, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeSetupError(f"{path}: ONNX models need onnxruntime; install kfyolo's export extra "
                                    "(uv sync --extra export, or pip install 'kfyolo[export]')") from e
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeSetupError(f"{path}: --device {device} but this onnxruntime has no CUDA provider "
                                        "(install onnxruntime-gpu)")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's warnings would break the progress bar
        if threads > 0:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises its own Fail / InvalidProtobuf / NoSuchFile types
            raise RuntimeSetupError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from e
        self.meta: ModelMetadata = read_metadata(
            self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)
        self.names, self.stride, self.device = self.meta.names, self.meta.stride, torch.device("cpu")
        shape = self.session.get_inputs()[0].shape  # e.g. ['batch', 3, 'height', 'width'] or [1, 3, 640, 640]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_hw = (shape[2], shape[3]) if all(isinstance(s, int) for s in shape[2:]) else None

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = batch.astype(np.float32) / np.float32(255)  # the same float32 division as torch's
        n, step = len(x), self.fixed_batch or len(x)
        outs = []
        for i in range(0, n, step):
            chunk = x[i:i + step]
            if len(chunk) < step:  # a fixed-batch model: pad with blank images, drop their rows
                chunk = np.concatenate((chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)))
            outs.append(self.session.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0][:n - i])
        return torch.from_numpy(np.concatenate(outs) if len(outs) > 1 else outs[0])


def open_session(weights: str | Path, device: torch.device, amp: str = "auto",
                 memory_format: str = "channels_last", threads: int = 0) -> Session:
    """The session for a weights file, by its suffix: .onnx, .torchscript, else a checkpoint. `amp`
    (auto, fp16, bf16, off) applies to checkpoints; an exported model runs as exported (fp32)."""
    path = Path(weights)
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".torchscript"):
        if not path.is_file():
            raise RuntimeSetupError(f"--weights {path}: file not found")
        if amp not in ("auto", "off"):
            raise RuntimeSetupError(f"--weights {path}: an exported model runs at the precision it was exported "
                                    f"in (fp32); --amp {amp} applies to checkpoints only")
        return OnnxSession(path, device, threads) if suffix == ".onnx" else TorchScriptSession(path, device)
    return TorchSession(path, device, resolve_precision(amp, device), memory_format)
