"""One training epoch of the classic YOLOv5 loop. Every dependency is an argument; side effects go
through the RunLogger; the loop body is the maths.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from trainer import compiled, distributed
from trainer.amp import Precision
from trainer.ema import ModelEMA
from trainer.optim import BIAS_GROUP, set_momentum
from trainer.preempt import StopRequest
from trainer.runlog import RunLogger
from trainer.schedule import multiscale_size, resize_batch, warmup_step


# YOLOv5 v7.0 clips the gradient norm at 10 before every optimizer step; rarely active once training
# settles, it keeps the first steps of a fine-tune from being thrown off by one bad batch.
MAX_GRAD_NORM = 10.0
MAX_OVERFLOWS = 20  # consecutive fp16 overflows before the loss counts as diverged


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf on some rank; every rank stops and the checkpoints already saved stay."""

    def __init__(self, epoch: int, batch: int, parts: torch.Tensor, paths: tuple, bad_ranks: tuple[int, ...] = (),
                 rank: int = 0):
        where = f"epoch {epoch}, batch {batch}"
        kept = "checkpoints of earlier epochs (weights/last.pt) are kept as they were"
        if bad_ranks and rank not in bad_ranks:  # a peer's loss, not this rank's: say whose
            others = ", ".join(str(r) for r in bad_ranks)
            super().__init__(f"non-finite loss on rank {others} at {where}; this rank stops with it "
                             f"(rank {others}'s error names its images); {kept}.")
            return
        shown = ", ".join(str(p) for p in paths[:4])
        on = f" on rank {rank}" if bad_ranks else ""
        super().__init__(f"non-finite loss{on} at {where} (box, obj, cls = {parts[:3].tolist()}); first images in "
                         f"the batch: {shown}. Lower lr0 or check the labels; {kept}.")


@dataclass(frozen=True)
class EpochPlan:
    """Fixed facts about the epoch being trained."""

    epoch: int
    epochs: int
    batches: int            # nb: batches per epoch on this rank
    warmup_iters: int       # nw
    total_batch_size: int   # over all ranks
    nbs: int                # nominal batch: images per optimizer step once warm-up is over
    imgsz: int
    stride: int
    multi_scale: bool
    world_size: int
    warmup_bias_lr: float
    warmup_momentum: float
    momentum: float
    lr_factor: float        # lf(epoch)
    start_batch: int = 0    # batches of this epoch already trained (resuming a stopped epoch)
    start_mloss: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)  # their running mean losses


@dataclass
class StepCounter:
    """Carried across epochs and into checkpoints: when the optimizer last stepped."""

    last_opt_step: int = -1
    accumulate: int = 1


def train_one_epoch(model: torch.nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, ema: ModelEMA | None, loader: Iterable, plan: EpochPlan,
                    counter: StepCounter, precision: Precision, device: torch.device, rng: random.Random,
                    logger: RunLogger, stop: StopRequest | None = None) -> dict[str, float]:
    """Train over `loader` once (from batch plan.start_batch); returns mean losses and the lrs in use
    at the end. With `stop`, a SIGTERM/SIGINT ends the epoch early on an optimizer step (see
    trainer/preempt.py); then "stopped_at" holds the number of batches trained, else it is -1."""
    model.train()
    start = plan.start_batch
    mloss = torch.tensor(plan.start_mloss, dtype=torch.float32)  # running means of [box, obj, cls, total]
    if plan.multi_scale:
        for _ in range(start):  # the sizes of the batches trained before the stop
            multiscale_size(rng, plan.imgsz, plan.stride)
    stopped_at, step_at, mloss_at_step = -1, start, mloss.clone()
    overflows = 0  # consecutive non-finite losses (fp16 only)
    batch_s, tick = 0.0, time.perf_counter()
    epoch_lrs = tuple(g["initial_lr"] * plan.lr_factor for g in optimizer.param_groups)
    for g, lr in zip(optimizer.param_groups, epoch_lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    bar = logger.progress(loader, total=plan.batches, initial=start)
    for i, (imgs, targets, paths, _) in enumerate(bar, start=start):
        ni = i + plan.batches * plan.epoch
        imgs = imgs.to(device, non_blocking=True).float() / 255  # (B, 3, H, W) in [0, 1]
        if ni <= plan.warmup_iters:
            w = warmup_step(ni, plan.warmup_iters, epoch_lrs, BIAS_GROUP, plan.warmup_bias_lr,
                            plan.warmup_momentum, plan.momentum, plan.total_batch_size, plan.nbs)
            counter.accumulate = w.accumulate
            for g, lr in zip(optimizer.param_groups, w.lrs):
                g["lr"] = lr
                set_momentum(g, w.momentum)
        if plan.multi_scale:
            imgs = resize_batch(imgs, multiscale_size(rng, plan.imgsz, plan.stride), plan.stride)

        step_now = ni - counter.last_opt_step >= counter.accumulate
        with distributed.no_sync(model, skip_sync=not step_now):
            with precision.autocast():
                preds = compiled.forward(model, imgs)  # model(imgs); eager again if the compiled call fails
            loss, parts = loss_fn(preds, targets.to(device))
            # Every rank learns at once when any rank's loss is not finite (one small all-reduce
            # under DDP), so they all stop together instead of the others waiting out the timeout.
            flags = torch.zeros(plan.world_size)  # slot r: rank r's loss is not finite
            flags[distributed.rank()] = 0.0 if torch.isfinite(loss) else 1.0
            flags = distributed.all_reduce_max(flags)
            bad = flags.max().item() > 0
            if bad:
                overflows += 1
                # fp16: an overflow in the forward pass is GradScaler's business; it skips the step and
                # lowers the scale. Only a run of them (or any non-finite loss without a scaler) is fatal.
                if not scaler.is_enabled() or overflows > MAX_OVERFLOWS:
                    ranks = tuple(int(r) for r in torch.nonzero(flags).flatten()) if plan.world_size > 1 else ()
                    raise NonFiniteLossError(plan.epoch, i, parts, tuple(paths), ranks, distributed.rank())
            else:
                overflows = 0
            # DDP averages gradients over ranks; the loss is a per-rank sum over images, so scale
            # back up to a sum over the global batch (YOLOv5 convention).
            scaler.scale(loss * plan.world_size).backward()
        if step_now:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            counter.last_opt_step = ni

        if not bad:  # a skipped fp16 overflow does not enter the running means
            mloss = (mloss * i + parts.cpu()) / (i + 1)
        logger.batch(bar, plan.epoch, plan.epochs, mloss, targets.shape[0], imgs.shape[-1], device)
        logger.train_batch_images(ni, plan.epoch, imgs, targets, paths)
        if step_now:
            step_at, mloss_at_step = i + 1, mloss.clone()
        if stop is not None:
            now = time.perf_counter()
            batch_s, tick = (now - tick if not batch_s else 0.8 * batch_s + 0.2 * (now - tick)), now
            to_step = 0 if step_now else min(counter.last_opt_step + counter.accumulate - ni, plan.batches - 1 - i)
            decision = stop.poll(to_step, batch_s)
            if decision.stop and (step_now or decision.now):
                stopped_at, mloss = step_at, mloss_at_step  # batches after the last step are trained again
                break
    if hasattr(bar, "close"):
        bar.close()
    box, obj, cls, total = mloss.tolist()
    lrs = [g["lr"] for g in optimizer.param_groups]
    return {"box": box, "obj": obj, "cls": cls, "total": total, "lr0": lrs[0], "lr1": lrs[1], "lr2": lrs[2],
            "stopped_at": stopped_at}
