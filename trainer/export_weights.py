"""Convert weights into a kfyolo checkpoint that loads with `torch.load(..., weights_only=True)`.

    python -m trainer.export_weights --weights ../shared/weights/yolov5n.pt   # runs/weights/yolov5n-kfyolo.pt
    python -m trainer.export_weights --weights ../shared/weights/yolov5n.pt --out my/yolov5n.pt

The input is an official ultralytics YOLOv5 `.pt` (read without executing its pickled code) or a
kfyolo checkpoint (its inference part is kept: model, architecture, names). fp16 tensors become
fp32. The architecture, class names, strides and anchors travel with the weights.
`python -m trainer.export --format checkpoint` does the same and then checks the file like its
ONNX and TorchScript exports.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any, Sequence

from trainer import __version__
from trainer.checkpoint import CheckpointError, save_checkpoint
from trainer.models.foreign_pickle import UnsafePickleError
from trainer.models.pretrained import model_from_weights
from trainer.state import CHECKPOINT_FORMAT


def export(weights: str | Path, out: str | Path) -> dict[str, Any]:
    """Write `out` and return the checkpoint dict."""
    model, source = model_from_weights(weights)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "epoch": -1,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "spec": {**model.spec.to_dict(), "name": Path(weights).stem},
        "names": list(model.names),
        "source": {"path": str(weights), "format": source.origin},
        "optimizer": None, "raw_model": None, "scaler": None, "train_state": None,
        "hyp": {}, "opt": {}, "metrics": {}, "maps": [], "best_fitness": 0.0,
    }
    save_checkpoint(ckpt, out)
    return ckpt


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export_weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kfyolo {__version__}")
    p.add_argument("--weights", required=True, help="ultralytics YOLOv5 .pt or kfyolo checkpoint")
    p.add_argument("--out", help="where to write the kfyolo checkpoint (default: runs/weights/<name>-kfyolo.pt, "
                   "under the git-ignored runs folder rather than beside the code)")
    args = p.parse_args(argv)
    args.out = args.out or str(Path("runs") / "weights" / f"{Path(args.weights).stem}-kfyolo.pt")
    try:
        ckpt = export(args.weights, args.out)
    except (CheckpointError, UnsafePickleError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in ckpt["model"].values())
    print(f"wrote {args.out}: {ckpt['spec']['name']}, {len(ckpt['names'])} classes, {n:,} values "
          f"(from a {ckpt['source']['format']} checkpoint)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
