"""Read official ultralytics YOLOv5 `.pt` files without executing any pickled code.

An ultralytics checkpoint pickles whole `models.yolo.Model` objects, so `torch.load` would import
and run ultralytics code (and `weights_only=True` refuses it). This reader opens the torch zip
archive itself and unpickles `data.pkl` with an allow-list:

- torch nn modules and ultralytics model classes become inert `ForeignObject` records of their
  pickled state (no constructor, no `__setstate__` of the real class ever runs);
- tensors are rebuilt from the archive's raw storages with `torch.frombuffer`;
- a few harmless builtins (`set`, `OrderedDict`) are allowed;
- anything else (`os.system`, `builtins.eval`, `subprocess.*`, ...) raises `UnsafePickleError`.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


class ForeignCheckpointError(ValueError):
    """The file is not a readable torch zip checkpoint."""


_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# Classes whose pickled state we record (never instantiate). Module name prefixes are matched
# exactly per class name so that e.g. `models.common.os` can't sneak through.
_RECORDED_CLASSES = {
    "models.yolo": {"Model", "DetectionModel", "Detect", "BaseModel"},
    "models.common": {"Conv", "C3", "Bottleneck", "SPPF", "SPP", "Concat", "Focus", "DWConv",
                      "BottleneckCSP", "AutoShape", "DetectMultiBackend"},
    "torch.nn.modules.conv": {"Conv2d"},
    "torch.nn.modules.batchnorm": {"BatchNorm2d"},
    "torch.nn.modules.activation": {"SiLU", "LeakyReLU", "Hardswish", "ReLU"},
    "torch.nn.modules.container": {"Sequential", "ModuleList"},
    "torch.nn.modules.pooling": {"MaxPool2d"},
    "torch.nn.modules.upsampling": {"Upsample"},
    "torch.nn.modules.linear": {"Identity"},
    "argparse": {"Namespace"},
}


class ForeignObject:
    """Inert stand-in for a pickled object of a foreign class: holds its state, runs nothing."""

    foreign_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "ForeignObject":
        obj = object.__new__(cls)
        obj.__dict__["foreign_args"] = args
        obj.__dict__["foreign_state"] = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE(cls, args) lands here
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["foreign_state"] = state if isinstance(state, dict) else {"state": state}

    def __repr__(self) -> str:
        return f"<foreign {self.foreign_name}>"


_recorded_types: dict[str, type] = {}


def _recorded_type(qualname: str) -> type:
    if qualname not in _recorded_types:
        _recorded_types[qualname] = type(qualname.rsplit(".", 1)[-1], (ForeignObject,), {"foreign_name": qualname})
    return _recorded_types[qualname]


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool = False, *_: Any) -> torch.Tensor:
    return data  # plain tensors: we only want the values


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in {("builtins", "set"), ("__builtin__", "set")}:
            return set
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if name in _RECORDED_CLASSES.get(module, ()):
            return _recorded_type(f"{module}.{name}")
        raise UnsafePickleError(f"refusing to load global '{module}.{name}': not in the allow-list "
                                "(the file may contain code that would run on load)")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unsupported storage type {storage_type!r}")
        try:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
        except KeyError as e:
            raise ForeignCheckpointError(f"storage {key} missing from the archive") from e
        tensor = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
        if tensor.numel() != numel:
            raise ForeignCheckpointError(f"storage {key}: {tensor.numel()} elements, expected {numel}")
        return tensor


def load_foreign_pickle(path: str | Path) -> Any:
    """Unpickle a torch zip checkpoint with the allow-list above. Raises on anything unsafe."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ForeignCheckpointError(f"{path}: not a torch zip checkpoint ({e})") from e
    with archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ForeignCheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkls)}")
        prefix = pkls[0].rsplit("/", 1)[0]
        byteorder = archive.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in archive.namelist() else "little"
        if byteorder != "little":
            raise ForeignCheckpointError(f"{path}: big-endian checkpoints are not supported")
        return _SafeUnpickler(archive.read(pkls[0]), archive, prefix).load()


def module_state_dict(obj: ForeignObject, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """Rebuild `nn.Module.state_dict()` keys from a recorded module tree."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    state = obj.foreign_state
    skip = set(state.get("_non_persistent_buffers_set", ()))
    for name, t in state.get("_parameters", {}).items():
        if t is not None:
            out[prefix + name] = t
    for name, t in state.get("_buffers", {}).items():
        if t is not None and name not in skip:
            out[prefix + name] = t
    for name, child in state.get("_modules", {}).items():
        if isinstance(child, ForeignObject):
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


@dataclass(frozen=True)
class ForeignModel:
    """What kfyolo needs from an ultralytics checkpoint."""

    state_dict: "OrderedDict[str, torch.Tensor]"
    yaml: dict
    names: list[str]
    stride: list[float]
    source: str  # "model" or "ema": which entry the weights came from


def read_ultralytics_checkpoint(path: str | Path) -> ForeignModel:
    """Extract state_dict, architecture, class names and strides from an ultralytics `.pt`."""
    ckpt = load_foreign_pickle(path)
    if not isinstance(ckpt, dict):
        raise ForeignCheckpointError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    source = "ema" if isinstance(ckpt.get("ema"), ForeignObject) else "model"
    model = ckpt.get(source)
    if not isinstance(model, ForeignObject):
        raise ForeignCheckpointError(f"{path}: no pickled model under 'model' or 'ema'")
    state = model.foreign_state
    names = state.get("names", [])
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    stride = state.get("stride")
    return ForeignModel(
        state_dict=module_state_dict(model),
        yaml=dict(state.get("yaml") or {}),
        names=[str(n) for n in names],
        stride=[float(s) for s in stride.tolist()] if isinstance(stride, torch.Tensor) else [],
        source=source,
    )
