"""What an exported model says about itself, so a serving stack needs nothing else to use it.

The same JSON goes beside the model file (`model.onnx` -> `model.json`) and inside it (the ONNX
model's `metadata_props["kfyolo"]`, the TorchScript archive's `extra/kfyolo.json`), so a model
copied without its sidecar still knows its class names and stride.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METADATA_KEY = "kfyolo"
INPUT_NAME, OUTPUT_NAME = "images", "predictions"


def input_spec(pad_value: int, rect_pad: float) -> dict[str, Any]:
    return {
        "name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "channels": "RGB",
        "normalisation": "uint8 pixel / 255, so [0, 1]; no mean or std",
        "letterbox": {"resize": "long side to imgsz, aspect kept (cv2.INTER_AREA when shrinking, INTER_LINEAR "
                                "when enlarging), short side rounded up",
                      "pad": f"to a multiple of the stride plus {rect_pad} stride, centred, value {pad_value}",
                      "undo": "x = (x - padw) / rw, y = (y - padh) / rh, then clip to the image"},
    }


def output_spec(nc: int) -> dict[str, Any]:
    return {
        "name": OUTPUT_NAME, "shape": ["batch", "anchors", 5 + nc], "dtype": "float32",
        "columns": "cx, cy, w, h in input pixels, objectness, then nc class probabilities (sigmoids)",
        "score": "objectness x class probability",
        "nms": "not included: keep score > conf, then per-class NMS (IoU 0.45 for predict, 0.6 for mAP)",
    }


@dataclass(frozen=True)
class ModelMetadata:
    """An exported model's contract. `batch` / `input_hw` are None where the dimension is dynamic."""

    format: str  # onnx, torchscript or checkpoint
    names: tuple[str, ...]
    stride: int  # the largest; an input side must be a multiple of it
    strides: tuple[int, ...]
    imgsz: int  # the long side the model was exported and checked at
    batch: int | None
    input_hw: tuple[int, int] | None
    kfyolo_version: str
    source: str = ""  # the weights it came from
    source_format: str = ""  # kfyolo or ultralytics
    opset: int | None = None
    fused: bool = True  # BatchNorm folded into the convolutions
    exporter: str = ""
    created: str = ""
    input: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)  # trainer.export.ParityReport.to_dict()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["names"], d["strides"] = list(self.names), list(self.strides)
        d["input_hw"] = list(self.input_hw) if self.input_hw else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str) -> "ModelMetadata":
        try:
            return cls(**{**d, "names": tuple(d["names"]), "strides": tuple(d["strides"]),
                          "input_hw": tuple(d["input_hw"]) if d.get("input_hw") else None})
        except (KeyError, TypeError) as e:
            raise ValueError(f"{origin}: not kfyolo model metadata ({e})") from e


def sidecar(model_path: str | Path) -> Path:
    """model.onnx -> model.json."""
    return Path(model_path).with_suffix(".json")


def read_metadata(text: str | None, model_path: str | Path) -> ModelMetadata:
    """Metadata embedded in the model (`text`), else the sidecar JSON; a clear error without either."""
    origin = f"{model_path} (embedded)"
    if not text:
        path = sidecar(model_path)
        if not path.is_file():
            raise ValueError(f"{model_path}: no kfyolo metadata inside and no {path.name} beside it; "
                             "export it with python -m trainer.export")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin}: metadata is not valid JSON ({e.msg})") from e
    return ModelMetadata.from_dict(d, origin)
