"""Load weights into a model from a kfyolo checkpoint or an official ultralytics YOLOv5 `.pt`.

Fine-tuning (`load_matching`): tensors load by key where the shape matches; only the Detect head
may differ (another class count re-initialises its convs). Anything else that differs means the
checkpoint is another architecture, which is an error listing the mismatched keys.
Evaluation (`model_from_weights`): the model is built from the file's own architecture and every
tensor must load.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointError, load_checkpoint, refused_global
from trainer.models.foreign_pickle import read_ultralytics_checkpoint
from trainer.models.yolo import ModelConfigError, YoloModel, build_model, load_model_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceWeights:
    state_dict: dict[str, torch.Tensor]
    names: list[str]
    spec: dict        # architecture mapping (kfyolo spec or ultralytics yaml)
    origin: str       # "kfyolo" or "ultralytics"
    path: str = ""


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
        return SourceWeights(dict(ckpt["model"]), list(ckpt["names"]), dict(ckpt["spec"]), "kfyolo", str(path))
    except CheckpointError:
        try:
            foreign = read_ultralytics_checkpoint(path)
        except pickle.UnpicklingError as e:  # the allow-list refused a global: code would have run
            raise CheckpointError(f"--weights {path}: refused, {refused_global(e)}; kfyolo never executes code "
                                  "from a weights file") from None
        except ValueError as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"--weights {path}: neither a kfyolo checkpoint nor a readable ultralytics "
                                  f"checkpoint ({first})") from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in foreign.state_dict.items()}
        return SourceWeights(state, foreign.names, foreign.yaml, "ultralytics", str(path))


def _describe(keys: list[str], own: dict, theirs: dict, limit: int = 8) -> str:
    shown = []
    for k in keys[:limit]:
        mine = tuple(own[k].shape) if k in own else "absent"
        other = tuple(theirs[k].shape) if k in theirs else "absent"
        shown.append(f"{k} model {mine} vs file {other}")
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more


def load_matching(model: YoloModel, weights: SourceWeights, allow_head_mismatch: bool = True) -> LoadReport:
    """Copy every tensor whose key and shape match into `model`.

    With `allow_head_mismatch`, Detect conv tensors may differ (fine-tuning to another class
    count); any other difference raises CheckpointError listing the keys. Without it, every
    tensor of the model must be in the file with its shape.
    """
    own = model.state_dict()
    theirs = weights.state_dict
    head = f"model.{len(model.model) - 1}.m."
    mismatch = [k for k in theirs if k in own and own[k].shape != theirs[k].shape]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    tolerated = (lambda k: k.startswith(head)) if allow_head_mismatch else (lambda k: False)
    wrong = [k for k in mismatch + missing + unexpected if not tolerated(k)]
    if wrong:
        raise CheckpointError(f"{weights.path or 'weights'}: another architecture than the model "
                              f"({len(wrong)} mismatched keys): {_describe(wrong, own, theirs)}")
    update = {k: v.to(own[k].dtype) for k, v in theirs.items() if k in own and k not in mismatch}
    model.load_state_dict(update, strict=False)
    report = LoadReport(tuple(update), tuple(mismatch), tuple(missing), tuple(unexpected))
    log.info("weights (%s): %s", weights.origin, report.summary())
    return report


def model_from_weights(path: str | Path) -> tuple[YoloModel, SourceWeights]:
    """A model with the file's architecture, class names and every tensor of the file."""
    weights = read_weights(path)
    try:
        spec = load_model_spec(weights.spec)
        model = build_model(spec, names=weights.names or None)
    except ModelConfigError as e:
        raise CheckpointError(f"{path}: its architecture cannot be built ({e})") from e
    load_matching(model, weights, allow_head_mismatch=False)
    return model, weights
