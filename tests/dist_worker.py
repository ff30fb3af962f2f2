"""One rank of a distributed test scenario, started by tests/test_distributed.py with the environment
torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    python tests/dist_worker.py SCENARIO OUT_DIR

Each scenario writes `OUT_DIR/rank{r}.pt` (a dict of tensors and lists) for the test to compare.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import distributed  # noqa: E402
from trainer.config import Hyp  # noqa: E402
from trainer.loss import YoloLoss, scale_loss_gains  # noqa: E402
from trainer.models.yolo import build_model  # noqa: E402


def _labels(n: int, nc: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(0, 4))
        cls = rng.integers(0, nc, size=k).astype(np.float32)
        boxes = rng.uniform(0.2, 0.6, size=(k, 4)).astype(np.float32)
        out.append(np.concatenate([cls[:, None], boxes], 1))
    return out


def scenario_broadcast(ctx: distributed.DistContext, out: Path) -> dict:
    """For each sampler: rank 0 draws the epoch's image list; ranks pass different maps on purpose.
    Each rank's EpochSampler (the training loader's) then yields its shard of the list."""
    from trainer.data import weights as iw
    from trainer.data.epoch_sampler import EpochSampler
    from trainer.data.samplers import ImageSampler, LabelStats, SamplerConfig
    from trainer.fit import epoch_indices

    nc, n = 5, 37  # n not divisible by the world size: the sampler pads
    labels = _labels(n, nc, seed=1)
    maps = np.full(nc, 0.9 if ctx.rank else 0.1)
    maps[4] = 0.0
    record = {}
    for kind in os.environ["TEST_SAMPLERS"].split(","):
        image_sampler = ImageSampler(SamplerConfig(kind, rfs_t=0.5), LabelStats(labels, nc),
                                     iw.class_weights(labels, nc))
        lists, shards, images = [], [], []
        sampler = EpochSampler(n, batch_size=4, seed=7, rank=ctx.rank, world_size=ctx.world_size)
        for epoch in range(3):
            idx = epoch_indices(image_sampler, maps, seed=7, epoch=epoch, is_main=ctx.is_main)
            sampler.set_epoch(epoch, idx)
            samples = list(sampler)
            lists.append(idx.tolist())
            shards.append([s.position for s in samples])
            images.append([s.image for s in samples])
        record[kind] = {"lists": lists, "positions": shards, "images": images}
    return record


def _batch(seed: int, n: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(n, 3, size, size, generator=g)
    # the same target layout in every image keeps positives per rank equal, so per-rank means
    # average to the global mean exactly (see the loss docstring)
    rows = [[i, 0, 0.3, 0.4, 0.2, 0.3] for i in range(n)] + [[i, 2, 0.7, 0.6, 0.3, 0.2] for i in range(n)]
    return imgs, torch.tensor(rows, dtype=torch.float32)


def _train_steps(model: torch.nn.Module, imgs: torch.Tensor, targets: torch.Tensor, steps: int, world: int) -> None:
    """SGD steps with BatchNorm in eval mode: per-rank batch statistics would differ from the global
    batch's, and SyncBatchNorm has no CPU implementation. Every other parameter trains."""
    model.eval()
    core = model.module if hasattr(model, "module") else model
    loss_fn = YoloLoss(core.detect.anchors, 3, scale_loss_gains(Hyp().to_dict(), 3, 3, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for _ in range(steps):
        loss, _ = loss_fn(model(imgs), targets)
        (loss * world).backward()
        opt.step()
        opt.zero_grad()


def scenario_ddp_step(ctx: distributed.DistContext, out: Path) -> dict:
    """Each rank trains on its half of a global batch of 4; returns the final weights."""
    torch.manual_seed(0)
    model = build_model("yolov5n", nc=3)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    imgs, _ = _batch(0, 4)
    half = 4 // ctx.world_size
    mine = imgs[ctx.rank * half:(ctx.rank + 1) * half]
    _, targets = _batch(0, half)  # same layout on each rank, image index local to the rank
    _train_steps(ddp, mine, targets, steps=3, world=ctx.world_size)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state}


def scenario_die(ctx: distributed.DistContext, out: Path) -> dict:
    """Rank 1 dies before a collective; rank 0 must fail (not hang) within the timeout."""
    if ctx.rank == 1:
        os._exit(3)
    start = time.monotonic()
    try:
        for _ in range(3):
            distributed.broadcast_tensor(torch.zeros(4))
            distributed.barrier()
    except Exception as e:  # noqa: BLE001 - the error type varies with the backend
        torch.save({"error": f"{type(e).__name__}: {e}", "after_s": time.monotonic() - start}, out / "rank0.pt")
        sys.exit(1)
    return {"error": None}


def detecting_model(seed: int, nc: int) -> torch.nn.Module:
    """A randomly initialised yolov5n whose objectness bias is raised, so it emits plenty of boxes
    (some of which hit the labels) and validation has real work to merge."""
    torch.manual_seed(seed)
    model = build_model("yolov5n", nc=nc)
    with torch.no_grad():
        for conv in model.detect.m:
            conv.bias.view(model.detect.na, -1)[:, 4] += 4.0
    return model.eval()


def val_loader_for(data_yaml: str, batch: int, rank: int | None = None, world: int = 1):
    """The val split at 64 px, rect batches as training validates; sharded when rank is given."""
    from torch.utils.data import DataLoader

    from trainer.data.config import load_data_config
    from trainer.data.dataset import YoloDataset
    from trainer.validate import ShardedBatches

    cfg = load_data_config(data_yaml)
    ds = YoloDataset.from_config(cfg, "val", img_size=64, batch_size=batch, rect=True, pad=0.5, workers=1)
    if rank is None:
        return DataLoader(ds, batch_size=batch, shuffle=False, collate_fn=YoloDataset.collate_fn), cfg.names
    return DataLoader(ds, batch_sampler=ShardedBatches(len(ds), batch, rank, world),
                      collate_fn=YoloDataset.collate_fn), cfg.names


def scenario_sharded_val(ctx: distributed.DistContext, out: Path) -> dict:
    """Rank 1 starts from other weights; rank 0's are broadcast, then each validates its shard."""
    from trainer.amp import resolve_precision
    from trainer.validate import run_sharded_validation

    loader, names = val_loader_for(os.environ["TEST_DATA"], batch=3, rank=ctx.rank, world=ctx.world_size)
    model = detecting_model(seed=0 if ctx.is_main else 99, nc=len(names))
    distributed.broadcast_state(model, src=0)
    result = run_sharded_validation(model, loader, torch.device("cpu"), names, resolve_precision("off", torch.device("cpu")),
                                    is_main=ctx.is_main)
    return {"result": result, "batches": len(loader)}


SCENARIOS = {"sharded_val": scenario_sharded_val, "broadcast": scenario_broadcast, "ddp_step": scenario_ddp_step, "die": scenario_die}


def main() -> int:
    name, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    timeout = float(os.environ.get("TEST_DIST_TIMEOUT", "60"))
    ctx = distributed.init_distributed(distributed.env_context(), torch.device("cpu"), timeout_s=timeout)
    try:
        result = SCENARIOS[name](ctx, out)
        torch.save(result, out / f"rank{ctx.rank}.pt")
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
