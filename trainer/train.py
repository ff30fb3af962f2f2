"""Train a YOLOv5 detector with the classic epoch loop.

One process (CPU or one GPU):
    python -m trainer.train --data data.yaml --cfg yolov5n --imgsz 256 --epochs 30 --image-weights --device cpu

torchrun on one node (2 processes; --batch-size is the total over ranks):
    torchrun --standalone --nproc_per_node 2 -m trainer.train --data data.yaml --cfg yolov5n --batch-size 32

Two nodes (what a PyTorchJob pod runs; the operator sets the PET_* variables):
    torchrun --nnodes $PET_NNODES --nproc_per_node $PET_NPROC_PER_NODE --node_rank $PET_NODE_RANK \\
             --master_addr $PET_MASTER_ADDR --master_port $PET_MASTER_PORT -m trainer.train ...

Resume the latest run, or a given checkpoint; train only epochs up to 20 of the schedule:
    python -m trainer.train --resume                     # newest runs/train/*/weights/last.pt
    python -m trainer.train --resume runs/train/exp/weights/last.pt --stop-epoch 20

Data and runs on S3/MinIO (endpoint and keys from S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY;
the run is staged under $KFYOLO_CACHE/runs/ and uploaded after every epoch):
    python -m trainer.train --data s3://datasets/shapes/data.yaml --project s3://runs/train --epochs 30
    python -m trainer.train --resume s3://runs/train/exp/weights/last.pt
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from trainer import __version__
from trainer import distributed
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.config import ConfigError, TrainOptions, parse_overrides
from trainer.data.config import DataConfigError
from trainer.data.labels import DatasetError
from trainer.engine import NonFiniteLossError
from trainer.models.foreign_pickle import UnsafePickleError
from trainer.models.yolo import ModelConfigError
from trainer.preempt import Preempted, StopRequest, exit_code
from trainer.storage import StorageError, is_s3
from trainer.storage_sync import fetch_run

log = logging.getLogger("trainer")

# Options a resumed run may change; anything else must match the checkpoint.
RESUME_MUTABLE = {"device", "workers", "stop_epoch", "noval", "patience", "resume", "exist_ok", "maps", "dist_timeout",
                  "class_weights", "val_every", "memory_format", "cache", "grace_period", "results_plot",
                  "compile"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    p.add_argument("--version", action="version", version=f"kfyolo {__version__}")
    a = p.add_argument
    a("--data", help="data YAML (path/train/val/names), local or s3://bucket/prefix/data.yaml")
    a("--cfg", help="model: yolov5n|s|m|l|x or an architecture YAML (default: the --weights architecture, else yolov5n)")
    a("--weights", help="initial weights: a kfyolo checkpoint or an official ultralytics YOLOv5 .pt")
    a("--hyp", help="hyperparameter YAML or hyp.scratch / hyp.finetune (default hyp.scratch)")
    a("--hyp-override", action="append", metavar="KEY=VALUE", help="override one hyperparameter (repeatable)")
    a("--epochs", type=int, help="length of the whole schedule (default 100)")
    a("--stop-epoch", type=int, help="stop after this epoch of the schedule (train a block of it)")
    a("--batch-size", type=int, help="total batch size over all ranks (default 16)")
    a("--nbs", type=int, help="nominal batch size: gradients accumulate until about this many images make one "
      "optimizer step, and weight decay scales with it (default 64, as YOLOv5; a smaller one gives more steps "
      "for the same images, which pays on small datasets and CPU budgets)")
    a("--imgsz", "--img-size", "--img", dest="imgsz", type=int, help="train/val image size in pixels (default 640)")
    a("--image-weights", action="store_const", const=True, help="sample images by class_weights * (1 - maps)^2")
    a("--multi-scale", action="store_const", const=True, help="random image size in [0.5, 1.5] x imgsz per batch")
    a("--rect", action="store_const", const=True, help="rectangular training batches")
    a("--resume", nargs="?", const="latest",
      help="resume a run from its last.pt, local or s3:// (default: the newest local run)")
    a("--device", help="cpu, a CUDA index like 0, or empty for auto")
    a("--workers", type=int, help="max dataloader workers per rank (default 8; capped by the CPUs available)")
    a("--cache", choices=["auto", "ram", "off"],
      help="keep the decoded, resized images in RAM instead of decoding them every epoch (default auto: when "
      "train and val fit in a quarter of the memory available to the rank, cgroup limits included)")
    a("--project", help="parent folder of runs, local or s3://bucket/prefix (default runs/train)")
    a("--name", help="run name; runs/train/NAME, NAME2, ... (default exp)")
    a("--exist-ok", action="store_const", const=True, help="reuse project/name instead of incrementing")
    a("--seed", type=int, help="global seed (default 0)")
    a("--sync-bn", action="store_const", const=True, help="SyncBatchNorm across ranks (DDP only)")
    a("--optimizer", choices=["SGD", "Adam", "AdamW"], help="default SGD (Nesterov)")
    a("--linear-lr", action="store_const", const=True, help="linear LR decay instead of cosine")
    a("--patience", type=int, help="early-stop after this many epochs without improvement (default 100; 0 = off)")
    a("--amp", choices=["auto", "fp16", "bf16", "off"], help="mixed precision (default auto: fp16 + GradScaler on CUDA, fp32 on CPU; bf16 is opt-in on CPU)")
    a("--memory-format", choices=["channels_last", "contiguous"],
      help="the model's and the batches' memory layout (default channels_last: NHWC, faster on CPU and tensor cores)")
    a("--compile", nargs="?", const="inductor", metavar="BACKEND",
      help="compile the training model with torch.compile (default backend inductor; aot_eager and the others "
      "torch lists also work); a compile failure warns and training goes on eagerly. Off by default: on 2 CPU "
      "cores inductor compiled yolov5n in 100-130 s and then ran the bf16 step 8%% faster and the fp32 step no "
      "faster, which pays back only on long runs")
    a("--noval", action="store_const", const=True, help="validate only after the final epoch (--val-every 0)")
    a("--val-every", type=int, metavar="N",
      help="validate every N epochs (and after the last), refreshing the maps that drive the sampler (default 1)")
    a("--sampler", choices=["uniform", "classic", "rfs", "adaptive"],
      help="per-epoch image sampling: uniform (default), classic (= --image-weights: class_weights * (1 - maps)^2 "
      "summed over labels), rfs (LVIS repeat factors), adaptive (linear repeat factors t / f scaled by each class's "
      "AP deficit); "
      "see trainer/data/samplers.py")
    a("--rfs-t", type=float, help="repeat threshold t of rfs and adaptive: classes in fewer than a fraction t of "
      "the images repeat by sqrt(t / f) (default 0.1)")
    a("--sampler-power", type=float, help="adaptive: exponent on the AP deficit (default 2)")
    a("--cls-feedback", type=float, metavar="POWER",
      help="weight each class's classification loss by its AP deficit ** POWER (from maps; default 0 = off)")
    a("--maps", help="maps.json from an earlier evaluation: seeds the first epoch's image weights")
    a("--class-weights", help="class_weights.json ({'class_weights': [...]}); default: inverse label frequency")
    a("--deterministic", action="store_const", const=True, help="deterministic algorithms (slower)")
    a("--dist-timeout", type=float, help="seconds a rank waits for its peers before failing (default 1800)")
    a("--results-plot", choices=["always", "end"],
      help="draw results.png from results.csv when this run ends (default always), or only when it ends the "
      "schedule (end: for blocks that a later run continues, which draws the whole history; an earlier "
      "results.png left in the folder is removed, as it would show fewer epochs than results.csv)")
    a("--grace-period", type=float,
      help="seconds from SIGTERM/SIGINT to a saved, resumable exit: the step in progress finishes, last.pt "
      "records the position in the epoch, the exit code is 128 + the signal (default 25, under a pod's 30)")
    a("--auto-resume", action="store_true", default=None,
      help="if project/name already holds weights/last.pt of this run, resume from it instead of starting "
      "over (what a restarted pod or torchrun --max-restarts needs); implies --exist-ok")
    a("--local-rank", "--local_rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    return p


def latest_checkpoint(search: Path = Path("runs")) -> Path:
    found = sorted(search.rglob("last.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointError(f"--resume: no last.pt under {search}/")
    return found[-1]


class NothingToDo(Exception):
    """--auto-resume found the run already trained as far as it was asked."""


def existing_checkpoint(project: str, name: str) -> str:
    """project/name/weights/last.pt if it exists (local or S3), else ""."""
    if is_s3(project):
        from trainer.storage import Storage

        uri = f"{project.rstrip('/')}/{name}/weights/last.pt"
        return uri if Storage.from_env().exists(uri) else ""
    path = Path(project) / name / "weights" / "last.pt"
    return str(path) if path.is_file() else ""


def options_from_args(args: argparse.Namespace) -> tuple[TrainOptions, dict[str, Any] | None]:
    """Flags -> TrainOptions; for --resume, the checkpoint's options with the allowed changes."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("local_rank", "auto_resume")}
    if "hyp_override" in given:
        given["hyp_overrides"] = tuple(sorted(parse_overrides(given.pop("hyp_override")).items()))
    auto = bool(args.auto_resume) and "resume" not in given
    if auto:
        given["exist_ok"] = True
        fresh = TrainOptions(**given)  # checks the flags before looking for a checkpoint
        found = existing_checkpoint(fresh.project, fresh.name)
        if not found:
            return fresh, None
        log.info("--auto-resume: resuming from %s", found)
        given["resume"] = found
    if "resume" not in given:
        return TrainOptions(**given), None
    if is_s3(given["resume"]):  # the run folder comes down into its staging folder first
        path, project, name = fetch_run(given["resume"])
    else:
        path = latest_checkpoint() if given["resume"] == "latest" else Path(given["resume"])
        run_dir = path.resolve().parent.parent
        project, name = str(run_dir.parent), run_dir.name
    ckpt = load_checkpoint(path)
    if ckpt.get("optimizer") is None or ckpt.get("raw_model") is None:
        raise CheckpointError(f"--resume {path}: this checkpoint was stripped for inference; resume from last.pt")
    saved = TrainOptions.from_dict(ckpt["opt"])
    for key, value in given.items():
        if key not in RESUME_MUTABLE and getattr(saved, key) != value:
            raise ConfigError(f"--resume: --{key.replace('_', '-')} {value} differs from the checkpoint's "
                              f"{getattr(saved, key)!r}; a resumed run keeps its configuration")
    changes = {k: v for k, v in given.items() if k in RESUME_MUTABLE}
    changes.update(resume=given["resume"] if is_s3(given["resume"]) else str(path), project=project, name=name,
                   exist_ok=True)
    if "stop_epoch" not in given:
        changes["stop_epoch"] = 0
    done = ckpt["train_state"]["epoch"]
    if auto and done >= (changes.get("stop_epoch") or saved.epochs):
        raise NothingToDo(f"--auto-resume: {path} has already trained {done} epochs of {saved.epochs}; "
                          "nothing left to do")
    if done >= saved.epochs:
        raise ConfigError(f"--resume {path}: the run already finished all {saved.epochs} epochs")
    return saved.replace(**changes), ckpt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    is_main = distributed.env_context(args.local_rank).is_main
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s", force=True)
    # From here SIGTERM/SIGINT ask for a graceful stop instead of killing the process mid-write.
    stop = StopRequest()  # the default grace period until the options (checked) give theirs
    with stop:
        from trainer.fit import fit  # heavy imports after argument errors have had their chance

        try:
            opt, ckpt = options_from_args(args)
            stop.grace_s = opt.grace_period
            result = fit(opt, args.local_rank, ckpt, stop=stop)
        except NothingToDo as e:
            log.info("%s", e)
            return 0
        except Preempted as e:
            print(str(e), file=sys.stderr)
            return e.exit_code
        except (ConfigError, DataConfigError, DatasetError, CheckpointError, ModelConfigError,
                UnsafePickleError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (NonFiniteLossError, distributed.DistributedError, StorageError) as e:
            if stop.requested:  # a collective broke because a peer stopped first
                print(f"stopped by {stop.name}: {e}", file=sys.stderr)
                return exit_code(stop.signum)
            print(f"error: {e}", file=sys.stderr)
            return 1
        except RuntimeError as e:
            if not stop.requested:
                raise
            # torchrun ends the other ranks with SIGTERM when one dies; their collective then fails
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"stopped by {stop.name} while a collective failed (a peer rank left): {first[:300]}",
                  file=sys.stderr)
            return exit_code(stop.signum)
        if stop.requested and is_main:
            log.info("%s arrived after the last epoch was saved: the run is complete", stop.name)
    if is_main:
        where = f"{result.remote_dir} (staged in {result.run_dir})" if result.remote_dir else result.run_dir
        log.info("%d epoch%s trained%s; best fitness %.4f; results in %s", result.epochs_trained,
                 "" if result.epochs_trained == 1 else "s", " (early stop)" if result.stopped_early else "",
                 result.best_fitness, where)
    return 0


if __name__ == "__main__":
    from trainer.runlog import run_cli

    run_cli(main)
