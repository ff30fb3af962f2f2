"""The distributed path with 2 gloo processes on loopback, each started with torchrun's environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.models.yolo import build_model

WORKER = Path(__file__).with_name("dist_worker.py")
ENTRY = Path(__file__).with_name("nan_entry.py")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world: int = 2, timeout: float = 120, extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{scenario}: ranks still running after {timeout} s (a hang)")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return results


SAMPLER_KINDS = ["uniform", "classic", "rfs", "adaptive"]


def test_every_sampler_broadcasts_identical_lists_with_disjoint_covering_shards(tmp_path):
    results = launch("broadcast", tmp_path, extra_env={"TEST_SAMPLERS": ",".join(SAMPLER_KINDS)})
    assert all(r.returncode == 0 for r in results), [r.stdout[-2000:] for r in results]
    both = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sorted(both[0]) == sorted(both[1]) == sorted(SAMPLER_KINDS)
    n = 37
    for sampler in SAMPLER_KINDS:
        r0, r1 = both[0][sampler], both[1][sampler]
        assert r0["lists"] == r1["lists"], sampler  # rank 1 passed other maps: rank 0's list wins
        if sampler == "uniform":
            assert r0["lists"][0] == list(range(37))  # each image once; the loader's sampler shuffles
        else:
            assert r0["lists"][0] != r0["lists"][1], sampler  # a new draw each epoch
        for epoch in range(3):
            p0, p1 = r0["positions"][epoch], r1["positions"][epoch]
            assert len(p0) == len(p1) == 19  # ceil(37 / 2): the sampler pads one position
            assert len(set(p0) & set(p1)) <= 1  # disjoint but for the single padding repeat
            assert set(p0) | set(p1) == set(range(n))  # together they cover the whole list
            drawn = [r0["lists"][epoch][i] for i in p0 + p1]
            assert r0["images"][epoch] + r1["images"][epoch] == drawn  # the sampler yields the drawn images
            assert sorted(set(drawn)) == sorted(set(r0["lists"][epoch]))
        if sampler != "uniform":  # the weighted draws differ from one another and from uniform
            assert r0["lists"] != both[0]["uniform"]["lists"], sampler


def test_ddp_steps_equal_single_process_steps_and_ranks_stay_identical(tmp_path):
    results = launch("ddp_step", tmp_path)
    assert all(r.returncode == 0 for r in results), [r.stdout[-2000:] for r in results]
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt")["state"] for r in range(2))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"ranks diverged at {k}"

    # the same 3 steps in one process on the whole global batch
    sys.path.insert(0, str(WORKER.parent))
    import dist_worker

    torch.manual_seed(0)
    model = build_model("yolov5n", nc=3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    imgs, targets = dist_worker._batch(0, 4)
    dist_worker._train_steps(model, imgs, targets, steps=3, world=1)
    # Compare the updates, not the weights: summation order differs between one process and an
    # all-reduce, so agreement is to float rounding relative to how far each tensor moved.
    # (Updates below float resolution leave some tensors, e.g. BN weights near 1.0, unchanged.)
    worst, moved, total = 0.0, 0, 0
    for k, v in model.state_dict().items():
        if not v.is_floating_point() or "running" in k:
            continue
        single_delta, ddp_delta = v - initial[k], s0[k] - initial[k]
        scale = single_delta.norm().item()
        total += 1
        if scale == 0:
            assert ddp_delta.abs().max().item() <= 1.2e-7 * initial[k].abs().max().item(), k
            continue
        moved += 1
        worst = max(worst, (ddp_delta - single_delta).norm().item() / scale)
    assert moved >= total // 2  # every conv weight and bias; BN weights barely move in 3 steps
    assert worst < 1e-5


def test_a_dead_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    start = time.monotonic()
    results = launch("die", tmp_path, timeout=90, extra_env={"TEST_DIST_TIMEOUT": "20"})
    elapsed = time.monotonic() - start
    assert results[1].returncode == 3
    assert results[0].returncode != 0, results[0].stdout[-2000:]
    assert elapsed < 60
    info = torch.load(tmp_path / "rank0.pt")
    assert info["error"] and info["after_s"] < 30


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_once_under_torchrun(tmp_path, synthetic_yaml):
    """torchrun, 2 gloo ranks, trainer.train's real loop and loaders; rank 1's loss alone turns NaN at
    batch 2. Both ranks must stop there at once with the error, far inside the 300 s collective
    timeout, and no checkpoint of the poisoned step is written."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NAN_RANK="1", NAN_BATCH="2", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ENTRY), "--data", str(synthetic_yaml),
           "--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4", "--device", "cpu", "--epochs", "2",
           "--workers", "0", "--dist-timeout", "300", "--project", str(tmp_path), "--name", "nan"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # rank 1 names its batch's images; rank 0, whose own loss was finite, says whose loss it was
    assert "error: non-finite loss on rank 1 at epoch 0, batch 2 (box, obj, cls = " in out, out[-3000:]
    assert "error: non-finite loss on rank 1 at epoch 0, batch 2; this rank stops with it" in out, out[-3000:]
    assert elapsed < 150, out[-3000:]  # interpreter and torchrun start-up included; the timeout is 300 s
    assert not (tmp_path / "nan" / "weights" / "last.pt").exists()


def test_a_rank_that_cannot_reach_the_master_fails_naming_the_address(tmp_path, synthetic_yaml):
    port = free_port()  # nothing listens there
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--data", str(synthetic_yaml), "--device", "cpu",
                           "--dist-timeout", "5", "--project", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    assert f"rank 1: cannot join the process group at 127.0.0.1:{port} within 5 s" in proc.stderr
    assert elapsed < 60  # bounded by the timeout (plus interpreter start), not a hang
    assert not any(tmp_path.iterdir())  # nothing written by a rank that never joined


def test_sharded_validation_equals_single_process_validation(tmp_path, synthetic_yaml):
    """2 gloo ranks, each validating its batches after rank 0's weights were broadcast, give exactly
    the COCO figures of one process validating everything with the same model."""
    results = launch("sharded_val", tmp_path, extra_env={"TEST_DATA": str(synthetic_yaml)})
    assert all(r.returncode == 0 for r in results), [r.stdout[-2000:] for r in results]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert np.array_equal(r0["result"]["coco_stats"], r1["result"]["coco_stats"])  # rank 0's figures reach all
    assert r0["batches"] + r1["batches"] == 3  # 8 val images in batches of 3: 2 + 1

    sys.path.insert(0, str(WORKER.parent))
    import dist_worker
    from trainer.amp import resolve_precision
    from trainer.validate import run_validation

    loader, names = dist_worker.val_loader_for(str(synthetic_yaml), batch=3)
    model = dist_worker.detecting_model(seed=0, nc=len(names))
    single = run_validation(model, loader, torch.device("cpu"), names, resolve_precision("off", torch.device("cpu")))
    sharded = r0["result"]
    assert single["map50"] > 0  # the model finds some boxes: the comparison is not of zeros
    assert sharded["n_images"] == single["n_images"] == 8
    for key in ("coco_stats", "maps", "ap50_per_class", "p_per_class", "r_per_class"):
        assert np.array_equal(np.asarray(sharded[key]), np.asarray(single[key])), key
    for key in ("precision", "recall", "map50", "map", "val_box", "val_obj", "val_cls"):
        assert sharded[key] == single[key], key
