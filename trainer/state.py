"""Training state carried across epochs and into checkpoints, and the checkpoint dict itself.

Everything stored is a tensor or a plain Python value so checkpoints load with weights_only=True.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainer import __version__

CHECKPOINT_FORMAT = "kfyolo-checkpoint-v1"


@dataclass
class TrainState:
    epoch: int = 0                 # next epoch to train
    best_fitness: float = 0.0
    best_epoch: int = -1
    maps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (nc,) AP@.5:.95 per class
    last_opt_step: int = -1
    accumulate: int = 1
    # A run stopped inside `epoch` (trainer/preempt.py): the epoch's drawn image list, how many of
    # its items were trained over all ranks, and their running mean losses. images_done 0 = none.
    images_done: int = 0
    draw: np.ndarray | None = None
    epoch_mloss: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_fitness": float(self.best_fitness), "best_epoch": self.best_epoch,
                "maps": [float(m) for m in self.maps], "last_opt_step": self.last_opt_step,
                "accumulate": self.accumulate, "images_done": self.images_done,
                "draw": torch.from_numpy(np.asarray(self.draw, dtype=np.int64)) if self.draw is not None else None,
                "epoch_mloss": [float(v) for v in self.epoch_mloss]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        draw = d.get("draw")
        return cls(epoch=int(d["epoch"]), best_fitness=float(d["best_fitness"]), best_epoch=int(d["best_epoch"]),
                   maps=np.asarray(d["maps"], dtype=np.float64), last_opt_step=int(d["last_opt_step"]),
                   accumulate=int(d["accumulate"]), images_done=int(d.get("images_done", 0)),
                   draw=draw.numpy().astype(np.int64) if draw is not None else None,
                   epoch_mloss=tuple(float(v) for v in d.get("epoch_mloss", (0.0,) * 4)))

    def finish_epoch(self) -> None:
        """The epoch in progress is complete: nothing of it is left to resume."""
        self.images_done, self.draw, self.epoch_mloss = 0, None, (0.0, 0.0, 0.0, 0.0)


def capture_rng() -> dict[str, Any]:
    """Global RNG states as weights_only-safe values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def build_checkpoint(*, ema_model: torch.nn.Module, raw_model: torch.nn.Module, ema_updates: int,
                     optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler | None,
                     state: TrainState, hyp: dict, opt: dict, spec: dict, names: list[str],
                     metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """`model` holds the EMA weights (what inference and fine-tuning want); the rest is for resume.
    Every tensor in it is a copy on the CPU, so it can be written while training goes on."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "epoch": state.epoch - 1,  # last completed epoch (train_state.images_done > 0: part of the next one too)
        "model": owned(ema_model.state_dict()),
        "raw_model": owned(raw_model.state_dict()),
        "ema_updates": ema_updates,
        "optimizer": owned(optimizer.state_dict()) if optimizer is not None else None,
        "scaler": owned(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else None,
        "train_state": owned(state.to_dict()),
        "maps": [float(m) for m in state.maps],
        "best_fitness": float(state.best_fitness),
        "hyp": dict(hyp),
        "opt": dict(opt),
        "spec": dict(spec),
        "names": list(names),
        "metrics": dict(metrics or {}),
        "rng": capture_rng(),
    }


def owned(value: Any) -> Any:
    """`value` with each tensor in its dicts, lists and tuples replaced by a detached CPU copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: owned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(owned(v) for v in value)
    return value


def strip_for_inference(ckpt: dict[str, Any]) -> dict[str, Any]:
    """best.pt at the end of a run: drop optimizer and raw weights (about 3x smaller)."""
    out = dict(ckpt)
    out.update(optimizer=None, raw_model=None, scaler=None)
    return out
