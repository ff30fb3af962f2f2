"""A whole training run: setup, then the epoch loop with image weighting, validation, checkpoints
and early stopping. `train.py` turns command lines into `TrainOptions` and calls `fit`.

Every epoch starts with the sampler (trainer/data/samplers.py) drawing the epoch's image list on
rank 0, broadcast to every rank. Validation runs every --val-every epochs and after the last one;
under DDP it is sharded: rank 0's EMA weights are broadcast, every rank validates whole batches of
its share, and rank 0 merges the detections (trainer/validate.py), so the maps that steer the next
draw follow the model at about 1/world_size of a single-process pass. Rank 0 owns checkpoints and
every file written.

`--data s3://...` is downloaded once per node before anything reads it; with `--project s3://...` the
run folder is a local staging copy that rank 0 uploads after every epoch and at the end
(see trainer/storage_sync.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer import compiled, distributed
from trainer.amp import Precision, resolve_precision
from trainer.checkpoint import CheckpointWriter, save_checkpoint
from trainer.config import ConfigError, Hyp, TrainOptions, load_hyp, save_yaml
from trainer.data import image_cache
from trainer.data import weights as iw
from trainer.data.samplers import ImageSampler, LabelStats, loss_class_weights
from trainer.data.config import DataConfig, load_data_config
from trainer.data.dataset import YoloDataset, seed_worker, single_threaded_opencv
from trainer.data.epoch_sampler import EpochSampler
from trainer.data.labels import DatasetError
from trainer.ema import ModelEMA, unwrap
from trainer.engine import EpochPlan, StepCounter, train_one_epoch
from trainer.loss import YoloLoss, scale_loss_gains
from trainer.metrics.detection import fitness
from trainer.models.pretrained import load_matching, read_weights
from trainer.models.yolo import YoloModel, build_model, load_model_spec, summarise
from trainer.optim import build_optimizer
from trainer.preempt import Preempted, StopRequest
from trainer.runlog import RunLogger
from trainer.schedule import lr_factor, nominal_accumulate, scaled_weight_decay, warmup_iterations
from trainer.state import TrainState, build_checkpoint, strip_for_inference
from trainer.storage import is_s3
from trainer.storage_sync import RunSync, materialize_data, next_remote_run_dir, staging_dir
from trainer.validate import ShardedBatches, run_sharded_validation, run_validation

log = logging.getLogger("trainer")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    epochs_trained: int
    best_fitness: float
    stopped_early: bool
    last_metrics: dict[str, Any]
    remote_dir: str = ""            # s3://... when the run folder is mirrored there


@dataclass
class Run:
    """Everything the epoch loop needs, built once by `setup`."""

    opt: TrainOptions
    hyp: Hyp
    run_dir: Path
    model: torch.nn.Module          # DDP-wrapped when distributed
    ema: ModelEMA | None            # rank 0 only
    val_model: torch.nn.Module | None  # other ranks under DDP: receives rank 0's EMA weights to validate
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: YoloLoss
    precision: Precision
    device: torch.device
    train_set: YoloDataset
    train_loader: DataLoader
    val_loader: DataLoader          # under DDP, each rank's ShardedBatches of the val split
    names: list[str]
    class_weights: np.ndarray       # (nc,) normalised; inverse label frequency unless given
    sampler: ImageSampler
    state: TrainState
    ctx: distributed.DistContext
    logger: RunLogger
    sync: RunSync | None = None     # rank 0 of an S3 run: mirrors run_dir to the store
    stop: StopRequest | None = None  # SIGTERM/SIGINT (the CLI installs it; see trainer/preempt.py)
    # Rank 0's writer of last.pt/best.pt. On CUDA it writes while the next epoch trains, as the
    # training thread mostly waits for kernels there. On CPU it writes in place: serialising is
    # Python-bound (about 1,200 tensors for yolov5n) and fought the training thread for the GIL,
    # which left no gain (0.27-0.55 s against 0.34-0.37 s over 4 demo epochs).
    checkpoints: CheckpointWriter | None = None


# ---------------------------------------------------------------------------------------- setup

def next_run_dir(project: Path, name: str, exist_ok: bool) -> Path:
    """project/name, or the first free project/name2, name3, ... (unless exist_ok)."""
    path = project / name
    if exist_ok or not path.exists():
        return path
    n = 2
    while (project / f"{name}{n}").exists():
        n += 1
    return project / f"{name}{n}"


def choose_run_dir(opt: TrainOptions, resuming: bool) -> Path:
    """The run folder to write: project/name (resumed or new), or its local staging copy for S3."""
    if is_s3(opt.project):
        return staging_dir(opt.project, opt.name) if resuming else \
            next_remote_run_dir(opt.project, opt.name, opt.exist_ok)
    return Path(opt.project) / opt.name if resuming else next_run_dir(Path(opt.project), opt.name, opt.exist_ok)


def writable_run_dir(opt: TrainOptions, resuming: bool) -> Path:
    """choose_run_dir, checked writable before any work (a read-only --project used to fail in
    TensorBoard's makedirs after the data scan)."""
    run_dir = choose_run_dir(opt, resuming)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".kfyolo-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--project {opt.project}: cannot write the run folder {run_dir} "
                          f"({e.strerror or e})") from None
    return run_dir


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_workers(requested: int, batch_per_rank: int, ctx: distributed.DistContext) -> int:
    """Workers per rank: at most what was asked, the batch size, and this rank's share of CPUs."""
    share = available_cpus() // ctx.local_world_size
    workers = min(requested, batch_per_rank, share)
    if requested > 0 and workers == 0:
        log.warning("rank %d: %d CPUs for %d local ranks leaves no dataloader workers; images load in the "
                    "training process", ctx.rank, available_cpus(), ctx.local_world_size)
    return workers


def memory_format(name: str) -> torch.memory_format:
    return {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[name]


def build_model_for(opt: TrainOptions, names: list[str]) -> YoloModel:
    """Fresh from --cfg, or --weights (kfyolo or ultralytics) loaded where keys and shapes match."""
    if not opt.weights:
        return build_model(opt.cfg or "yolov5n", names=names)
    source = read_weights(opt.weights)
    spec = load_model_spec(opt.cfg) if opt.cfg else load_model_spec(source.spec)
    model = build_model(spec, names=names)
    load_matching(model, source)
    return model


def cache_images(mode: str, datasets: tuple[YoloDataset, ...], ctx: distributed.DistContext, threads: int) -> bool:
    """Decode the splits into RAM when --cache asks (see trainer/data/image_cache.py). It runs before the
    DataLoaders start their workers, which then share the cached pages."""
    decision = image_cache.decide(mode, sum(d.cache_bytes() for d in datasets), ctx.local_world_size)
    if decision.cache:
        t0 = time.perf_counter()
        for d in datasets:
            d.cache_images(threads)
        if ctx.is_main:
            log.info("%s; cached in %.1f s", decision.reason, time.perf_counter() - t0)
    elif ctx.is_main and mode != "off":
        log.warning("%s", decision.reason)
    return decision.cache


def make_loaders(opt: TrainOptions, hyp: Hyp, data: DataConfig, stride: int, ctx: distributed.DistContext,
                 device: torch.device) -> tuple[YoloDataset, DataLoader, DataLoader | None]:
    batch = opt.batch_size // ctx.world_size
    workers = loader_workers(opt.workers, batch, ctx)
    if workers:
        single_threaded_opencv()
    scan_threads = max(1, available_cpus() // ctx.local_world_size)
    train_set = YoloDataset.from_config(data, "train", img_size=opt.imgsz, batch_size=batch, augment=True,
                                        hyp=hyp.to_dict(), rect=opt.rect, stride=stride, seed=opt.seed,
                                        workers=scan_threads)
    # The sampler carries each epoch's draw and every item's augmentation seed (see
    # trainer/data/epoch_sampler.py), so the workers can persist across epochs and validations.
    sampler = EpochSampler(train_set.n, batch, seed=opt.seed, shuffle=not opt.rect, rank=ctx.rank,
                           world_size=ctx.world_size, whole_batches=opt.rect)
    train_loader = DataLoader(
        train_set, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        collate_fn=YoloDataset.collate_fn, worker_init_fn=seed_worker, persistent_workers=workers > 0)
    val_set = YoloDataset.from_config(data, "val", img_size=opt.imgsz, batch_size=batch * 2, augment=False,
                                      rect=True, stride=stride, pad=0.5, workers=scan_threads)
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", collate_fn=YoloDataset.collate_fn,
                  worker_init_fn=seed_worker, persistent_workers=workers > 0)
    if ctx.distributed:  # every rank validates whole batches of its share (see trainer/validate.py)
        shard = ShardedBatches(len(val_set), batch * 2, ctx.rank, ctx.world_size)
        val_loader = DataLoader(val_set, batch_sampler=shard, **common)
    else:
        val_loader = DataLoader(val_set, batch_size=batch * 2, shuffle=False, **common)
    if ctx.is_main:
        log.info("%s", train_set.report.summary())
        log.info("%s", val_set.report.summary())
    cache_images(opt.cache, (train_set, val_set), ctx, scan_threads)
    return train_set, train_loader, val_loader


def read_class_vector(path: str, key: str, flag: str, n: int, upper: float | None = 1.0,
                      names: list[str] | None = None) -> np.ndarray:
    """A per-class list from a JSON file ({key: [...]} or a bare list), checked for length and range,
    and, when the file names its classes, against the dataset's names (a file from another dataset
    with as many classes would otherwise apply silently)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read ({e})") from e
    if names is not None and isinstance(record, dict) and record.get("names") is not None:
        theirs = [str(x) for x in record["names"]]
        if theirs != list(names):
            diff = next((i for i, (a, b) in enumerate(zip(theirs, names)) if a != b), min(len(theirs), len(names)))
            got = theirs[diff] if diff < len(theirs) else "(none)"
            want = names[diff] if diff < len(names) else "(none)"
            raise ConfigError(f"{flag} {path}: its classes are not this dataset's (class {diff} is {got!r} there, "
                              f"{want!r} here)")
    values = record.get(key) if isinstance(record, dict) else record
    if not isinstance(values, list) or len(values) != n:
        raise ConfigError(f"{flag} {path}: expected a list of {n} per-class values under '{key}'")
    try:
        out = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: values must be numbers ({e})") from e
    if not np.all(np.isfinite(out)) or out.min() < 0 or (upper is not None and out.max() > upper):
        bound = f"[0, {upper:g}]" if upper is not None else ">= 0"
        raise ConfigError(f"{flag} {path}: values must be finite and {'in ' if upper is not None else ''}{bound}")
    return out


def initial_maps(path: str, names: list[str], current: np.ndarray) -> np.ndarray:
    """`--maps maps.json` from an earlier evaluation seeds the first epoch's image weights."""
    return read_class_vector(path, "maps", "--maps", len(names), names=names) if path else current


def run_class_weights(path: str, labels: list[np.ndarray], nc: int, names: list[str] | None = None) -> np.ndarray:
    """`--class-weights` (normalised here) or the inverse label frequency of the training split."""
    if not path:
        return iw.class_weights(labels, nc)
    weights = read_class_vector(path, "class_weights", "--class-weights", nc, upper=None, names=names)
    if weights.sum() <= 0:
        raise ConfigError(f"--class-weights {path}: all weights are zero")
    return weights / weights.sum()


def setup(opt: TrainOptions, ctx: distributed.DistContext, device: torch.device,
          resume: dict[str, Any] | None = None) -> Run:
    """Build the run folder, data, model, optimizer and loss; restore state when resuming."""
    hyp = load_hyp(opt.hyp, dict(opt.hyp_overrides))
    if opt.compile:  # a bad backend name fails before anything is written
        try:
            compiled.check_backend(opt.compile)
        except compiled.CompileError as e:
            raise ConfigError(str(e)) from None
    if opt.sync_bn and ctx.distributed and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA: torch's SyncBatchNorm has no CPU implementation")
    if opt.batch_size % ctx.world_size:
        raise ConfigError(f"--batch-size {opt.batch_size} must be a multiple of the world size {ctx.world_size}")
    data = load_data_config(materialize_data(opt.data) if is_s3(opt.data) else opt.data)
    names = list(data.names)
    seed_everything(opt.seed + ctx.rank, opt.deterministic)
    torch.set_num_threads(max(1, available_cpus() // ctx.local_world_size))

    model = build_model_for(opt, names) if resume is None else build_model(resume["spec"], names=names)
    model = model.to(device, memory_format=memory_format(opt.memory_format))
    stride = max(int(model.stride.max()), 32)
    if opt.imgsz % stride:
        raise ConfigError(f"--imgsz {opt.imgsz} must be a multiple of the model's max stride {stride}")

    chosen = str(writable_run_dir(opt, resume is not None)) if ctx.is_main else ""
    run_dir = Path(distributed.broadcast_object(chosen))
    sync = None
    if ctx.is_main and is_s3(opt.project):
        sync = RunSync(run_dir, f"{opt.project.rstrip('/')}/{run_dir.name}")
        log.info("run folder %s is staged in %s", sync.uri, run_dir)
    logger = RunLogger(run_dir, names, enabled=ctx.is_main)
    if ctx.is_main:
        (run_dir / "weights").mkdir(parents=True, exist_ok=True)
        save_yaml(hyp.to_dict(), run_dir / "hyp.yaml")
        save_yaml(opt.to_dict(), run_dir / "opt.yaml")
        log.info("%s: %s at 640x640", model.spec.name, summarise(model, 640))

    try:
        train_set, train_loader, val_loader = make_loaders(opt, hyp, data, stride, ctx, device)
    except DatasetError as e:  # e.g. every image rejected: the report says why, in the run folder
        if ctx.is_main and getattr(e, "report", None) is not None:
            (run_dir / "dataset_report.json").write_text(json.dumps({e.report.split: e.report.to_dict()}, indent=1))
        raise
    if not any(len(labels) for labels in train_set.labels):
        raise DatasetError(f"{opt.data}: the training split has no labels (all {train_set.n} images are "
                           "backgrounds), so there is nothing to learn")
    if ctx.is_main:  # what validation kept, skipped and why, next to the results
        reports = {"train": train_set.report.to_dict(), "val": val_loader.dataset.report.to_dict()}
        (run_dir / "dataset_report.json").write_text(json.dumps(reports, indent=1))
    precision = resolve_precision(opt.amp, device)
    optimizer = build_optimizer(model, opt.optimizer, hyp.lr0, hyp.momentum,
                                scaled_weight_decay(hyp.weight_decay, opt.batch_size, opt.nbs))
    for g in optimizer.param_groups:
        g["initial_lr"] = hyp.lr0
    if opt.sync_bn and ctx.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = ModelEMA(model) if ctx.is_main else None
    val_model = copy.deepcopy(unwrap(model)).eval() if ctx.distributed and not ctx.is_main else None
    scaler = precision.grad_scaler()
    state = TrainState(maps=np.zeros(len(names)), accumulate=nominal_accumulate(opt.batch_size, opt.nbs))
    if resume is not None:
        state = restore_state(resume, model, ema, optimizer, scaler)
    state.maps = initial_maps(opt.maps, names, state.maps)
    if opt.compile:  # after the EMA and validation copies, which stay eager; DDP wraps the compiled module
        compiled.compile_in_place(model, opt.compile)
    if ctx.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    det = unwrap(model).detect
    loss_fn = YoloLoss(det.anchors, len(names), scale_loss_gains(hyp.to_dict(), det.nl, len(names), opt.imgsz))
    nominal = nominal_accumulate(opt.batch_size, opt.nbs)
    steps = (f"{opt.batch_size * nominal} images/step (batch {opt.batch_size} x accumulate {nominal})"
             if state.accumulate == nominal else  # a resume inside the warm-up
             f"{opt.batch_size * state.accumulate} images/step now, in the warm-up (batch {opt.batch_size} x "
             f"accumulate {state.accumulate}, rising to {nominal})")
    logger.info("precision %s on %s%s; %s; %d dataloader workers per rank", precision.name, device,
                f", compiled ({opt.compile}; the first steps compile)" if opt.compile else "", steps,
                train_loader.num_workers)
    class_weights = run_class_weights(opt.class_weights, train_set.labels, len(names), names)
    sampler = ImageSampler(opt.sampler_config(), LabelStats(train_set.labels, len(names)), class_weights)
    logger.info("sampler %s%s%s; validation %s", sampler.kind,
                f" (t {opt.rfs_t:g})" if sampler.kind in ("rfs", "adaptive") else "",
                f"; class loss weighted by AP deficit^{opt.cls_feedback:g}" if opt.cls_feedback else "",
                "after the last epoch only" if opt.noval or not opt.val_every else
                f"every {opt.val_every} epoch(s), sharded over {ctx.world_size} rank(s)")
    if resume is not None:  # rows and records of epochs the checkpoint does not hold are redone
        logger.forget_from(state.epoch)
    return Run(opt, hyp, run_dir, model, ema, val_model, optimizer, scaler, loss_fn, precision, device, train_set,
               train_loader, val_loader, names, class_weights, sampler, state, ctx, logger, sync,
               checkpoints=CheckpointWriter(background=device.type == "cuda") if ctx.is_main else None)


def restore_state(ckpt: dict[str, Any], model: torch.nn.Module, ema: ModelEMA | None,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> TrainState:
    from trainer.state import restore_rng

    model.load_state_dict(ckpt["raw_model"])
    if ema is not None:
        ema.load_state_dict({"model": ckpt["model"], "updates": ckpt["ema_updates"]})
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt.get("rng"))
    return TrainState.from_dict(ckpt["train_state"])


# ---------------------------------------------------------------------------------------- epochs

def epoch_indices(sampler: ImageSampler, maps: np.ndarray, seed: int, epoch: int, is_main: bool) -> np.ndarray:
    """This epoch's image list: rank 0 draws n indices with `sampler` seeded by (seed, epoch) and
    broadcasts them (in a tensor on the device the backend needs), so every rank holds rank 0's list
    whatever its own maps say. Each rank's EpochSampler then takes a disjoint shard."""
    indices = torch.zeros(sampler.stats.n, dtype=torch.int64)
    if is_main:
        indices = torch.as_tensor(sampler.draw(maps, seed, epoch), dtype=torch.int64)
    return distributed.broadcast_tensor(indices, src=0).numpy()


def weight_images(run: Run, epoch: int) -> None:
    """Hand the epoch's draw to the loader's sampler, set the class loss weights; record both (rank 0).
    A stopped epoch (state.images_done > 0) keeps the list it was drawn with and skips what it trained."""
    maps, state = run.state.maps, run.state
    if state.images_done and state.draw is not None:
        draw = distributed.broadcast_tensor(torch.from_numpy(state.draw), src=0).numpy()
    else:
        draw = epoch_indices(run.sampler, maps, run.opt.seed, epoch, run.ctx.is_main)
    run.train_loader.sampler.set_epoch(epoch, draw, skip=state.images_done)
    record: dict[str, Any] = {"epoch": epoch, "sampler": run.sampler.kind, "names": run.names,
                              "maps": [round(float(m), 6) for m in maps]}
    if run.opt.cls_feedback:
        loss_w = loss_class_weights(maps, run.opt.cls_feedback)
        run.loss_fn.set_class_weights(torch.as_tensor(loss_w, dtype=torch.float32))
        record["loss_class_weights"] = [round(float(w), 6) for w in loss_w]
    factors = run.sampler.class_factors(maps)
    record.update({
        "class_weights": [float(w) for w in factors / max(float(factors.sum()), 1e-12)],
        "class_draws": [int(c) for c in run.sampler.stats.counts[draw].sum(0)],
        "class_labels": [int(c) for c in run.sampler.stats.counts.sum(0)],
    })
    run.logger.image_weights(record)


def epoch_plan(run: Run, epoch: int) -> EpochPlan:
    opt, hyp, state = run.opt, run.hyp, run.state
    nb = run.train_loader.sampler.batches_per_epoch()  # the whole epoch's, also when resuming inside it
    return EpochPlan(
        start_batch=state.images_done // opt.batch_size, start_mloss=tuple(state.epoch_mloss),
        epoch=epoch, epochs=opt.epochs, batches=nb, warmup_iters=warmup_iterations(hyp.warmup_epochs, nb),
        total_batch_size=opt.batch_size, nbs=opt.nbs, imgsz=opt.imgsz, stride=max(int(unwrap(run.model).stride.max()), 32),
        multi_scale=opt.multi_scale, world_size=run.ctx.world_size, warmup_bias_lr=hyp.warmup_bias_lr,
        warmup_momentum=hyp.warmup_momentum, momentum=hyp.momentum,
        lr_factor=lr_factor(opt.epochs, hyp.lrf, opt.linear_lr)(epoch))


def validate_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Validate the EMA model after `epoch` when the schedule says so; every rank gets the metrics."""
    if not run.opt.validates_after(epoch):
        return {}
    if not run.ctx.distributed:
        return run_validation(run.ema.ema, run.val_loader, run.device, run.names, run.precision, run.loss_fn)
    model = run.ema.ema if run.ctx.is_main else run.val_model
    distributed.broadcast_state(model, src=0)
    return run_sharded_validation(model, run.val_loader, run.device, run.names, run.precision, run.loss_fn,
                                  is_main=run.ctx.is_main)


def save_epoch(run: Run, metrics: dict[str, Any], is_best: bool) -> None:
    model = unwrap(run.model)
    ckpt = build_checkpoint(
        ema_model=run.ema.ema, raw_model=model, ema_updates=run.ema.updates, optimizer=run.optimizer,
        scaler=run.scaler, state=run.state, hyp=run.hyp.to_dict(), opt=run.opt.to_dict(),
        spec=model.spec.to_dict(), names=run.names,
        metrics={k: float(metrics[k]) for k in ("precision", "recall", "map50", "map") if k in metrics})
    weights = run.run_dir / "weights"
    # best.pt is the same file as this last.pt (a hard link) until last.pt is next replaced
    run.checkpoints.write(ckpt, weights / "last.pt", links=[weights / "best.pt"] if is_best else [])
    if "maps" in metrics:
        maps = {"names": run.names, "maps": [float(m) for m in run.state.maps], "epoch": run.state.epoch - 1,
                "ap50": [float(a) for a in metrics["ap50_per_class"]],
                "val_labels": [int(n) for n in metrics["n_gt_per_class"]]}
        (run.run_dir / "maps.json").write_text(json.dumps(maps, indent=1))


def run_epochs(run: Run) -> TrainResult:
    opt, state, ctx = run.opt, run.state, run.ctx
    stop = opt.stop_epoch or opt.epochs
    counter = StepCounter(state.last_opt_step, state.accumulate)
    metrics: dict[str, Any] = {}
    stopped_early = False
    start = state.epoch
    for epoch in range(start, stop):
        if run.stop is not None and run.stop.agreed():  # a signal before this epoch began
            stop_between_epochs(run, epoch)
        weight_images(run, epoch)
        # Shuffling, augmentation and multi-scale sizes are functions of (seed, epoch): resumable.
        rng = random.Random(f"{opt.seed}-{epoch}-multiscale")
        started = time.perf_counter()
        plan = epoch_plan(run, epoch)
        train_stats = train_one_epoch(run.model, run.loss_fn, run.optimizer, run.scaler, run.ema, run.train_loader,
                                      plan, counter, run.precision, run.device, rng, run.logger, run.stop)
        train_stats["train_s"] = time.perf_counter() - started
        state.last_opt_step, state.accumulate = counter.last_opt_step, counter.accumulate
        stopped_at = train_stats.pop("stopped_at")
        if stopped_at >= 0:
            stop_inside_epoch(run, plan, stopped_at, train_stats)
        state.finish_epoch()
        started = time.perf_counter()
        metrics = validate_epoch(run, epoch)
        train_stats["val_s"] = time.perf_counter() - started if metrics else 0.0
        state.epoch = epoch + 1
        stop_now = is_best = False
        if metrics:  # on every rank: the maps steer the next draw and the class loss weights
            state.maps = np.asarray(metrics["maps"], dtype=np.float64)
            fi = fitness(metrics)
            if fi > state.best_fitness or state.best_epoch < 0:
                state.best_fitness, state.best_epoch, is_best = fi, epoch, True
        if ctx.is_main:
            save_epoch(run, metrics, is_best)
            run.logger.epoch_end(epoch, {**train_stats, **{k: v for k, v in metrics.items() if isinstance(v, float)}})
            if run.sync is not None:  # after results.csv and the checkpoints of this epoch are written
                run.checkpoints.wait()
                run.sync.push()
            stop_now = bool(metrics) and patience_exhausted(epoch, state.best_epoch, opt.patience)
            if stop_now:
                run.logger.info("early stop: no fitness improvement for %d epochs (best %.4f at epoch %d)",
                                opt.patience, state.best_fitness, state.best_epoch)
        stopped_early = bool(distributed.broadcast_object(stop_now))
        distributed.barrier()
        if stopped_early:
            break
    if ctx.is_main:
        run.checkpoints.wait()
    return TrainResult(run.run_dir, state.epoch - start, state.best_fitness, stopped_early, metrics,
                       run.sync.uri if run.sync is not None else "")


def patience_exhausted(epoch: int, best_epoch: int, patience: int) -> bool:
    """Early stop: `patience` epochs have passed since the best one (0 = never stop early)."""
    return patience > 0 and epoch - best_epoch >= patience


def stop_inside_epoch(run: Run, plan: EpochPlan, done: int, stats: dict[str, Any]) -> None:
    """Save where a signal stopped the epoch (`done` batches trained, rank 0), then raise Preempted
    on every rank."""
    state, stop = run.state, run.stop
    state.draw = run.train_loader.sampler.draw  # the list the epoch trains on, for --resume
    state.images_done = done * run.opt.batch_size  # over all ranks
    state.epoch_mloss = (stats["box"], stats["obj"], stats["cls"], stats["total"])
    where = f"in epoch {plan.epoch} ({done} of {plan.batches} batches trained)"
    if run.ctx.is_main:
        save_epoch(run, {}, is_best=False)
        run.checkpoints.wait()
        if run.sync is not None:
            run.sync.push()
    distributed.barrier()
    raise Preempted(stop.signum, preempted_message(run, where))


def stop_between_epochs(run: Run, epoch: int) -> None:
    """A signal arrived between epochs (or before the first): last.pt already holds every finished
    epoch, once the writes in flight land, so there is nothing more to save."""
    if run.ctx.is_main:
        run.checkpoints.wait()
    distributed.barrier()
    raise Preempted(run.stop.signum, preempted_message(run, f"before epoch {epoch}"))


def preempted_message(run: Run, where: str) -> str:
    last = run.run_dir / "weights" / "last.pt"
    if not run.ctx.is_main:
        return f"rank {run.ctx.rank}: stopped by {run.stop.name} {where}"
    if not last.exists():
        return f"stopped by {run.stop.name} {where}: nothing trained yet, so no checkpoint"
    uri = f"{run.sync.uri}/weights/last.pt" if run.sync is not None else str(last)
    return f"stopped by {run.stop.name} {where}; resume with: python -m trainer.train --resume {uri}"


def finish(run: Run) -> None:
    """At the end of the full schedule best.pt loses its optimizer state (it is for inference)."""
    if not run.ctx.is_main:
        return
    best = run.run_dir / "weights" / "best.pt"
    if best.exists() and run.state.epoch >= run.opt.epochs:
        from trainer.checkpoint import load_checkpoint

        save_checkpoint(strip_for_inference(load_checkpoint(best)), best)


def close_checkpoints(run: Run, failed: bool) -> None:
    """Let the checkpoint writes in flight land. When training has already failed, a failed write
    is logged rather than raised, so the error reported is the first one."""
    if run.checkpoints is None:
        return
    try:
        run.checkpoints.close()
    except Exception as e:
        if not failed:
            raise
        log.error("%s", e)


def fit(opt: TrainOptions, local_rank: int | None = None, resume: dict[str, Any] | None = None,
        stop: StopRequest | None = None) -> TrainResult:
    """Run training as this process's part of the job (world size from the torchrun environment).
    With `stop` (installed by the CLI), SIGTERM/SIGINT end it with a resumable checkpoint by raising
    Preempted (trainer/preempt.py)."""
    ctx = distributed.env_context(local_rank)
    device = distributed.select_device(opt.device, ctx.local_rank)
    ctx = distributed.init_distributed(ctx, device, timeout_s=opt.dist_timeout)
    run = None
    failed = True
    try:
        run = setup(opt, ctx, device, resume)
        run.stop = stop
        result = run_epochs(run)
        finish(run)
        failed = False
    finally:
        try:
            if run is not None:
                close_checkpoints(run, failed)
        finally:
            if run is not None:  # results.png is drawn while the process group winds down
                run.logger.start_closing(results_plot=run.opt.results_plot == "always"
                                         or run.state.epoch >= run.opt.epochs)
                run.model = unwrap(run.model)  # free DDP's reducer before its process group goes
            try:
                distributed.cleanup()
            finally:
                if run is not None:
                    run.logger.close()
    if run.sync is not None:  # finish rewrote best.pt and closing the logger drew results.png
        run.sync.push()
    return result
