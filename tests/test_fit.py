"""Loop wiring: shuffling, worker sizing, early stopping and maps-driven image weighting."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from trainer import distributed
from trainer.config import ConfigError, TrainOptions
from trainer.data.epoch_sampler import EpochSampler
from trainer.fit import initial_maps, loader_workers, next_run_dir, setup
from trainer.train import main


def _opt(data, tmp_path, **kw):
    return TrainOptions(data=str(data), cfg="yolov5n", imgsz=64, batch_size=4, device="cpu", workers=1,
                        project=str(tmp_path), epochs=1, **kw)


def test_training_data_is_shuffled_without_ddp(tmp_path, synthetic_yaml):
    run = setup(_opt(synthetic_yaml, tmp_path), distributed.DistContext(), torch.device("cpu"))
    try:
        sampler = run.train_loader.sampler
        assert isinstance(sampler, EpochSampler) and sampler.shuffle  # YOLOv5 mid-2020 forgot this
        sampler.set_epoch(0)
        order = [s.position for s in sampler]
        assert sorted(order) == list(range(run.train_set.n)) and order != sorted(order)
        assert run.train_loader.persistent_workers == (run.train_loader.num_workers > 0)
        assert isinstance(run.val_loader.sampler, SequentialSampler)
        assert run.val_loader.dataset.rect and not run.val_loader.dataset.augment
    finally:
        run.logger.close()


def test_rect_training_keeps_order(tmp_path, synthetic_yaml):
    run = setup(_opt(synthetic_yaml, tmp_path, rect=True), distributed.DistContext(), torch.device("cpu"))
    try:
        sampler = run.train_loader.sampler
        assert isinstance(sampler, EpochSampler) and sampler.whole_batches and not sampler.shuffle
        sampler.set_epoch(2)
        assert [s.position for s in sampler] == list(range(run.train_set.n))
    finally:
        run.logger.close()


def test_workers_are_sized_to_the_cpus_per_local_rank(monkeypatch):
    monkeypatch.setattr("trainer.fit.available_cpus", lambda: 8)
    one = distributed.DistContext()
    four = distributed.DistContext(rank=1, world_size=4, local_world_size=4)
    assert loader_workers(8, 16, one) == 8
    assert loader_workers(8, 16, four) == 2
    assert loader_workers(8, 1, one) == 1  # never more workers than images per batch
    monkeypatch.setattr("trainer.fit.available_cpus", lambda: 2)
    assert loader_workers(8, 16, four) == 0  # and it says so (warning), not silently


def test_run_dirs_increment(tmp_path):
    assert next_run_dir(tmp_path, "exp", False) == tmp_path / "exp"
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp2").mkdir()
    assert next_run_dir(tmp_path, "exp", False) == tmp_path / "exp3"
    assert next_run_dir(tmp_path, "exp", True) == tmp_path / "exp"


def test_initial_maps_validation(tmp_path):
    names = ["a", "b"]
    p = tmp_path / "maps.json"
    p.write_text(json.dumps({"maps": [0.25, 0.75]}))
    assert initial_maps(str(p), names, np.zeros(2)).tolist() == [0.25, 0.75]
    p.write_text(json.dumps([0.5, 1.5]))
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        initial_maps(str(p), names, np.zeros(2))
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        initial_maps(str(p), names, np.zeros(2))
    assert initial_maps("", names, np.ones(2)).tolist() == [1, 1]
    p.write_text(json.dumps({"names": ["a", "b"], "maps": [0.25, 0.75]}))  # its names match: accepted
    assert initial_maps(str(p), names, np.zeros(2)).tolist() == [0.25, 0.75]
    p.write_text(json.dumps({"names": ["a", "zebra"], "maps": [0.25, 0.75]}))  # another dataset's, same count
    with pytest.raises(ConfigError, match="its classes are not this dataset's \\(class 1 is 'zebra' there, 'b' here\\)"):
        initial_maps(str(p), names, np.zeros(2))


def test_class_weights_file_names_are_checked(tmp_path):
    from trainer.fit import run_class_weights

    p = tmp_path / "class_weights.json"
    p.write_text(json.dumps({"names": ["a", "b"], "class_weights": [1.0, 3.0]}))
    assert run_class_weights(str(p), [], 2, ["a", "b"]).tolist() == [0.25, 0.75]
    p.write_text(json.dumps({"names": ["b", "a"], "class_weights": [1.0, 3.0]}))  # reordered: not the same
    with pytest.raises(ConfigError, match="--class-weights .*class 0 is 'b' there, 'a' here"):
        run_class_weights(str(p), [], 2, ["a", "b"])


def test_patience_counts_epochs_since_the_best_fitness():
    """The rule by itself, on a fitness history that improves, stalls, and improves again."""
    from trainer.fit import patience_exhausted

    fitness = [0.1, 0.3, 0.2, 0.25, 0.4, 0.39, 0.38, 0.37]
    best, stopped = -1, None
    for epoch, fi in enumerate(fitness):
        if best < 0 or fi > fitness[best]:
            best = epoch
        if patience_exhausted(epoch, best, patience=3):
            stopped = epoch
            break
    assert stopped == 7 and best == 4  # the stall at epochs 2-3 was shorter than 3 epochs
    assert not patience_exhausted(50, 0, patience=0)  # 0 = never stop early
    assert patience_exhausted(2, 0, patience=2) and not patience_exhausted(1, 0, patience=2)


def test_patience_stops_a_run_that_does_not_improve(tmp_path, synthetic_yaml):
    # With zero learning rates the model never improves: best stays at epoch 0.
    code = main(["--data", str(synthetic_yaml), "--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4",
                 "--device", "cpu", "--workers", "0", "--project", str(tmp_path), "--name", "p", "--epochs", "6",
                 "--patience", "2", "--hyp-override", "lr0=1e-12", "--hyp-override", "warmup_bias_lr=0"])
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "p" / "results.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]


def test_maps_from_an_evaluation_steer_the_first_epoch(tmp_path, synthetic_yaml):
    """Common classes detected perfectly, the rare one not at all: the rare class's images should
    be drawn far above its label share."""
    maps = tmp_path / "maps.json"
    maps.write_text(json.dumps({"maps": [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]}))
    code = main(["--data", str(synthetic_yaml), "--cfg", "yolov5n", "--imgsz", "64", "--batch-size", "4",
                 "--device", "cpu", "--workers", "0", "--project", str(tmp_path), "--name", "m", "--epochs", "1",
                 "--image-weights", "--maps", str(maps), "--noval"])
    assert code == 0
    record = json.loads((tmp_path / "m" / "image_weights.jsonl").read_text().splitlines()[0])
    assert record["maps"] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert record["class_weights"] == pytest.approx([0, 0, 0, 0, 0, 1])
    draws, labels = record["class_draws"], record["class_labels"]
    assert labels[5] > 0
    # Only images holding a hexagon have weight, so each of the 24 drawn images contains one.
    assert draws[5] >= 24
    assert draws[5] / sum(draws) > 3 * labels[5] / sum(labels)


def test_class_weights_file_overrides_the_label_frequencies(tmp_path):
    from trainer.fit import run_class_weights

    labels = [np.array([[0, 0.5, 0.5, 0.1, 0.1], [1, 0.5, 0.5, 0.1, 0.1], [1, 0.2, 0.2, 0.1, 0.1]])]
    assert run_class_weights("", labels, 2).tolist() == pytest.approx([2 / 3, 1 / 3])
    p = tmp_path / "cw.json"
    p.write_text(json.dumps({"class_weights": [1.0, 3.0]}))
    assert run_class_weights(str(p), labels, 2).tolist() == [0.25, 0.75]
    p.write_text(json.dumps({"class_weights": [-1.0, 3.0]}))
    with pytest.raises(ConfigError, match="values must be finite and >= 0"):
        run_class_weights(str(p), labels, 2)
    p.write_text(json.dumps({"class_weights": [0, 0]}))
    with pytest.raises(ConfigError, match="all weights are zero"):
        run_class_weights(str(p), labels, 2)


def test_nominal_batch_sets_accumulation_and_weight_decay(tmp_path, synthetic_yaml):
    """--nbs 16 with batch 4: 4 batches per optimizer step (not 16), weight decay scaled to 16 images."""
    run = setup(_opt(synthetic_yaml, tmp_path, nbs=16), distributed.DistContext(), torch.device("cpu"))
    try:
        assert run.state.accumulate == 4
        decays = sorted({g["weight_decay"] for g in run.optimizer.param_groups})
        assert decays == [0.0, pytest.approx(0.0005)]  # 4 * 4 / 16 = 1x the hyp value; BN and biases none
    finally:
        run.logger.close()
    with pytest.raises(ConfigError, match="--nbs"):
        _opt(synthetic_yaml, tmp_path, nbs=0)


def test_each_optimizer_step_clips_the_gradient_norm(tmp_path, synthetic_yaml):
    """With SGD at lr 1 and no momentum or decay, a step moves the weights by exactly the clipped
    gradient, so a loss scaled a millionfold may move them by at most MAX_GRAD_NORM per step."""
    import random

    from trainer.engine import MAX_GRAD_NORM, StepCounter, train_one_epoch
    from trainer.fit import epoch_plan

    opt = _opt(synthetic_yaml, tmp_path, nbs=4, hyp_overrides=(("warmup_epochs", 0.0),))
    run = setup(opt, distributed.DistContext(), torch.device("cpu"))
    try:
        params = [p for p in run.model.parameters() if p.requires_grad]
        run.optimizer = torch.optim.SGD([{"params": params[k::3]} for k in range(3)], lr=1.0)  # the loop logs 3 groups
        for g in run.optimizer.param_groups:
            g["initial_lr"] = 1.0
        steps = []

        def huge_loss(preds, targets):
            loss, parts = run.loss_fn(preds, targets)
            return loss * 1e6, parts

        before = torch.cat([p.detach().flatten().clone() for p in params])
        plan = epoch_plan(run, 0)
        loader = [next(iter(run.train_loader))]  # one batch, one optimizer step
        plan = type(plan)(**{**plan.__dict__, "batches": 1, "warmup_iters": 0, "lr_factor": 1.0})
        train_one_epoch(run.model, huge_loss, run.optimizer, run.scaler, None, loader, plan, StepCounter(-1, 1),
                        run.precision, run.device, random.Random(0), run.logger)
        moved = float((torch.cat([p.detach().flatten() for p in params]) - before).norm())
        assert MAX_GRAD_NORM * 0.99 < moved < MAX_GRAD_NORM * 1.01  # clipped, and the clip was active
    finally:
        run.logger.close()
