"""Load weights into a model from a kfyolo checkpoint or an official ultralytics YOLOv5 `.pt`.

Tensors load by key where the shape matches; the rest keep their fresh initialisation and are
reported (fine-tuning to another class count re-initialises the Detect convs this way).
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.models.foreign_pickle import read_ultralytics_checkpoint
from trainer.models.yolo import YoloModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceWeights:
    state_dict: dict[str, torch.Tensor]
    names: list[str]
    spec: dict        # architecture mapping (kfyolo spec or ultralytics yaml)
    origin: str       # "kfyolo" or "ultralytics"


@dataclass(frozen=True)
class LoadReport:
    loaded: tuple[str, ...]
    shape_mismatch: tuple[str, ...]   # present in both, different shapes: kept fresh
    missing: tuple[str, ...]          # in the model, absent from the file: kept fresh
    unexpected: tuple[str, ...]       # in the file, absent from the model: ignored

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; re-initialised {len(self.shape_mismatch)} with other shapes, "
                f"{len(self.missing)} missing; ignored {len(self.unexpected)} unknown")


def read_weights(path: str | Path) -> SourceWeights:
    """kfyolo checkpoints load with weights_only=True; anything else is tried as ultralytics."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights {path}: file not found")
    try:
        ckpt = load_checkpoint(path)
        return SourceWeights(dict(ckpt["model"]), list(ckpt["names"]), dict(ckpt["spec"]), "kfyolo")
    except CheckpointError as kfyolo_error:
        try:
            foreign = read_ultralytics_checkpoint(path)
        except (pickle.UnpicklingError, ValueError) as e:
            raise CheckpointError(f"--weights {path}: neither a kfyolo checkpoint ({kfyolo_error}) "
                                  f"nor a readable ultralytics checkpoint ({e})") from e
        state = {k: v.float() if v.is_floating_point() else v for k, v in foreign.state_dict.items()}
        return SourceWeights(state, foreign.names, foreign.yaml, "ultralytics")


def load_matching(model: YoloModel, weights: SourceWeights) -> LoadReport:
    """Copy every tensor whose key and shape match into `model`."""
    own = model.state_dict()
    loaded, mismatch = [], []
    update = {}
    for key, value in weights.state_dict.items():
        if key in own:
            if own[key].shape == value.shape:
                update[key] = value.to(own[key].dtype)
                loaded.append(key)
            else:
                mismatch.append(key)
    model.load_state_dict(update, strict=False)
    report = LoadReport(tuple(loaded), tuple(mismatch),
                        tuple(sorted(set(own) - set(weights.state_dict))),
                        tuple(sorted(set(weights.state_dict) - set(own))))
    log.info("weights (%s): %s", weights.origin, report.summary())
    return report
