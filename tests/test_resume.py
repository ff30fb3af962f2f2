"""Exact resume: epochs [0, 2) then a resumed [2, 4) end bitwise where an uninterrupted run does."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import load_checkpoint
from trainer.train import main

FLAGS = ["--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4", "--device", "cpu", "--epochs", "4",
         "--multi-scale", "--seed", "5", "--deterministic"]
# the seed's image weights, and the evaluation-driven sampler with the class loss weights (every
# epoch validates, so maps, the draw and the loss weights all move and must all resume)
SAMPLERS = {"classic": ["--image-weights"],
            "adaptive+cls": ["--sampler", "adaptive", "--rfs-t", "0.5", "--cls-feedback", "1"]}
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_block_then_resume_matches_an_uninterrupted_run_bitwise(tmp_path, synthetic_yaml, sampler):
    data = ["--data", str(synthetic_yaml), "--project", str(tmp_path), "--workers", "1",  # worker seeding too
            *SAMPLERS[sampler]]
    assert main([*data, *FLAGS, "--name", "whole"]) == 0
    assert main([*data, *FLAGS, "--name", "blocks", "--stop-epoch", "2"]) == 0
    first = load_checkpoint(tmp_path / "blocks" / "weights" / "last.pt")
    assert first["epoch"] == 1 and first["train_state"]["epoch"] == 2
    assert main(["--resume", str(tmp_path / "blocks" / "weights" / "last.pt"), "--workers", "1"]) == 0

    whole, blocks = _same_final_weights(tmp_path, "resume")
    assert whole["train_state"] == blocks["train_state"]
    def rows(run):  # wall time aside, the same losses and metrics epoch by epoch
        return [{k: v for k, v in r.items() if k not in ("train_s", "val_s")}
                for r in csv.DictReader((tmp_path / run / "results.csv").open())]

    assert rows("whole") == rows("blocks") and len(rows("whole")) == 4
    iw_whole = (tmp_path / "whole" / "image_weights.jsonl").read_text()
    assert iw_whole == (tmp_path / "blocks" / "image_weights.jsonl").read_text()


def _same_final_weights(tmp_path: Path, how: str) -> tuple[dict, dict]:
    """Assert the 'whole' and 'blocks' runs ended at epoch 3 with bitwise-equal model and EMA."""
    whole = load_checkpoint(tmp_path / "whole" / "weights" / "last.pt")
    blocks = load_checkpoint(tmp_path / "blocks" / "weights" / "last.pt")
    assert whole["epoch"] == blocks["epoch"] == 3
    for part in ("model", "raw_model"):
        for k, v in whole[part].items():
            assert torch.equal(v, blocks[part][k]), f"{part}.{k} differs after {how}"
    return whole, blocks


def _torchrun(args: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(port), "-m", "trainer.train", *args], cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_block_then_resume_under_ddp_matches_bitwise(tmp_path, synthetic_yaml):
    """The same with 2 gloo ranks: sampler shards, broadcast draws, sharded validation and gradient
    all-reduce included. The adaptive sampler with class feedback only: it needs everything the
    classic one does (maps from validation, broadcast draws) and more (the class loss weights)."""
    data = ["--data", str(synthetic_yaml), "--project", str(tmp_path), "--workers", "0", *SAMPLERS["adaptive+cls"]]
    _torchrun([*data, *FLAGS, "--name", "whole"])
    _torchrun([*data, *FLAGS, "--name", "blocks", "--stop-epoch", "2"])
    _torchrun(["--resume", str(tmp_path / "blocks" / "weights" / "last.pt"), "--workers", "0"])
    _same_final_weights(tmp_path, "a DDP resume")
    assert (tmp_path / "whole" / "image_weights.jsonl").read_text() == \
        (tmp_path / "blocks" / "image_weights.jsonl").read_text()


def test_rect_training_under_ddp_gives_each_rank_whole_batches(tmp_path, synthetic_yaml):
    """--rect with 2 ranks used to fail with 'stack expects each tensor to be equal size': the rect
    shapes follow consecutive positions, which a DistributedSampler interleaved. Each rank now takes
    whole batches (trainer/data/epoch_sampler.py)."""
    import cv2
    import numpy as np

    root = tmp_path / "data"
    shapes = [(32, 64), (64, 32), (48, 64), (64, 48), (64, 64), (24, 64), (64, 24), (40, 64), (64, 40), (56, 64)]
    for split, picks in (("train", shapes), ("val", shapes[:4])):
        for k, (h, w) in enumerate(picks):  # aspect ratios far apart: rect batches get different shapes
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "images" / split / f"{k}.png"), np.full((h, w, 3), 40 * (k % 6), np.uint8))
            (root / "labels" / split / f"{k}.txt").write_text(f"{k % 2} 0.5 0.5 0.4 0.4\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    _torchrun(["--data", str(root / "data.yaml"), "--project", str(tmp_path), "--name", "rect", "--workers", "0",
               "--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4", "--device", "cpu", "--epochs", "1",
               "--rect", "--seed", "5"])
    rows = list(csv.DictReader((tmp_path / "rect" / "results.csv").open()))
    assert len(rows) == 1 and float(rows[0]["total"]) > 0


def test_ddp_through_the_real_loop_equals_one_process(tmp_path):
    """torchrun with 2 gloo ranks against one process, through make_loaders and train_one_epoch, on a
    dataset of one image repeated without augmentation: every rank's BatchNorm statistics then equal
    the global batch's, so the two runs must agree (loss scaling by world size, gradient averaging,
    accumulation, EMA) up to float summation order."""
    import cv2
    import numpy as np

    from trainer.checkpoint import load_checkpoint

    root = tmp_path / "data"
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for split, n in (("train", 8), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k in range(n):
            cv2.imwrite(str(root / "images" / split / f"{k}.png"), img)
            (root / "labels" / split / f"{k}.txt").write_text("0 0.4 0.5 0.3 0.4\n1 0.7 0.3 0.2 0.2\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    flags = ["--data", str(root / "data.yaml"), "--project", str(tmp_path), "--workers", "0", "--cfg", "yolov5n",
             "--imgsz", "64", "--batch-size", "4", "--nbs", "8", "--device", "cpu", "--epochs", "2", "--seed", "1",
             "--noval", "--deterministic"]
    for key in ("mosaic", "hsv_h", "hsv_s", "hsv_v", "translate", "scale", "fliplr"):
        flags += ["--hyp-override", f"{key}=0"]
    # Loss gains 100x smaller keep the gradient norm under the clipping threshold (10), which would
    # otherwise hide a wrong gradient scale; lr0 100x larger keeps the steps the same size.
    for key, value in (("box", 0.0005), ("obj", 0.01), ("cls", 0.005), ("lr0", 1.0), ("warmup_bias_lr", 0.0)):
        flags += ["--hyp-override", f"{key}={value}"]
    assert main([*flags, "--name", "one"]) == 0
    _torchrun([*flags, "--name", "two"])
    one, two = (load_checkpoint(tmp_path / r / "weights" / "last.pt") for r in ("one", "two"))
    assert one["train_state"]["last_opt_step"] == two["train_state"]["last_opt_step"]
    worst = 0.0
    for k, v in one["raw_model"].items():
        # BatchNorm's running variance is the unbiased one, n / (n - 1) with n = B x H x W per rank:
        # on the 2 x 2 maps of stride 32, 8 / 7 on a rank against 16 / 15 in one process. It is not
        # trained and does not enter the training forward pass, so it is left out.
        if v.is_floating_point() and not k.endswith("running_var"):
            start = 1.0  # compare the change, not the value: both started from the same seed
            worst = max(worst, (v - two["raw_model"][k]).abs().max().item() / (v.abs().max().item() + start))
    assert worst < 1e-4, worst
