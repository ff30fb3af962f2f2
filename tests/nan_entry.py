"""A torchrun entry point for the non-finite-loss test: trainer.train's own main, real loaders and
DDP, with one fault planted: rank $NAN_RANK's loss turns NaN at its batch $NAN_BATCH of epoch 0.

    torchrun --nproc_per_node 2 tests/nan_entry.py --data ... (trainer.train's flags)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer import loss  # noqa: E402
from trainer.train import main  # noqa: E402

_real_call = loss.YoloLoss.__call__
_calls = {"n": 0}


def _poisoned(self, preds, targets):
    value, parts = _real_call(self, preds, targets)
    if torch.is_grad_enabled() and os.environ["RANK"] == os.environ["NAN_RANK"]:  # training, not validation
        _calls["n"] += 1
        if _calls["n"] == int(os.environ["NAN_BATCH"]) + 1:
            value = value * float("nan")
    return value, parts


loss.YoloLoss.__call__ = _poisoned

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
