"""Components called through `.python_func` with artifacts in tmp_path (no KFP runtime)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from kfp.dsl import Artifact, Dataset, Metrics, Model

from components import class_weights, evaluate, prepare_dataset, train_block
from components.launchers import TrainRequest, parse_hyp_overrides
from trainer.checkpoint import load_checkpoint
from trainer.data.labels import DatasetError

IMAGE = "kfyolo:test"


def _art(cls, tmp_path: Path, name: str):
    return cls(name=name, uri=str(tmp_path / name))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, synthetic_yaml):
    tmp = tmp_path_factory.mktemp("components")
    ds, report = _art(Dataset, tmp, "dataset"), _art(Artifact, tmp, "report")
    prepare_dataset.component(IMAGE).python_func(data=str(synthetic_yaml), dataset=ds, report=report)
    cw = _art(Artifact, tmp, "weights")
    class_weights.component(IMAGE).python_func(dataset=ds, weights=cw)
    return tmp, ds, cw


def test_prepare_dataset_writes_a_self_contained_copy(prepared, synthetic_yaml):
    tmp, ds, _ = prepared
    root = Path(ds.path)
    assert (root / "data.yaml").is_file()
    assert len(list((root / "images" / "train").iterdir())) == 24
    assert len(list((root / "labels" / "val").iterdir())) == 8
    assert ds.metadata["train_images"] == 24 and ds.metadata["nc"] == 6
    report = json.loads(Path(tmp / "report").read_text())
    assert report["train"]["n_kept"] == 24 and report["train"]["rejected"] == []


def test_prepare_dataset_rejects_bad_files_and_reports_them(tmp_path, synthetic_yaml):
    src = tmp_path / "src"
    shutil.copytree(synthetic_yaml.parent, src)
    victim = sorted((src / "labels" / "train").glob("*.txt"))[0]
    victim.write_text("0 0.5 0.5 0.2\n")  # 4 fields
    ds, report = _art(Dataset, tmp_path, "dataset"), _art(Artifact, tmp_path, "report")
    prepare_dataset.component(IMAGE).python_func(data=str(src), dataset=ds, report=report)
    rejected = json.loads(Path(report.path).read_text())["train"]["rejected"]
    assert len(rejected) == 1 and f"{victim}:1: expected 5 fields" in rejected[0][1]
    assert ds.metadata["train_rejected"] == 1 and ds.metadata["train_images"] == 23


def test_prepare_dataset_fails_when_nothing_survives(tmp_path, synthetic_yaml):
    src = tmp_path / "src"
    shutil.copytree(synthetic_yaml.parent, src)
    for f in (src / "labels" / "val").glob("*.txt"):
        f.write_text("9 0.5 0.5 0.2 0.2\n")  # class id >= nc everywhere
    for f in (src / "images" / "val").glob("*.jpg"):
        if not (src / "labels" / "val" / f"{f.stem}.txt").exists():
            f.unlink()  # background images would survive
    with pytest.raises(DatasetError, match="val"):
        prepare_dataset.component(IMAGE).python_func(data=str(src), dataset=_art(Dataset, tmp_path, "d"),
                                                     report=_art(Artifact, tmp_path, "r"))


def test_class_weights_are_normalised_inverse_frequencies(prepared):
    _, ds, cw = prepared
    record = json.loads(Path(cw.path).read_text())
    inv = [1 / max(c, 1) for c in record["label_counts"]]
    assert record["class_weights"] == pytest.approx([w / sum(inv) for w in inv])
    assert cw.metadata["hexagon"] == max(cw.metadata.values())  # the rare class weighs most


def test_class_weights_log_line_is_short_for_many_classes(prepared, tmp_path, capsys):
    _, ds, _ = prepared
    src = tmp_path / "many"
    shutil.copytree(ds.path, src)
    names = [f"c{i:02d}" for i in range(20)]  # classes 6..19 have no labels: each counts as 1, weighs most
    (src / "data.yaml").write_text(json.dumps({"path": str(src), "train": "images/train", "val": "images/val",
                                               "names": names}))
    capsys.readouterr()
    cw = _art(Artifact, tmp_path, "weights")
    class_weights.component(IMAGE).python_func(dataset=Dataset(name="many", uri=str(src)), weights=cw)
    line = [ln for ln in capsys.readouterr().out.splitlines() if "class weights:" in ln][0]
    shown = line.split("class weights: ")[1].split(", ")
    assert shown[-1] == "... 8 more" and len(shown) == 13
    assert all(n.startswith(("c06", "c07", "c08", "c09", "c1")) for n in shown[:12])  # the empty classes
    assert len(cw.metadata) == 20  # the full list stays in the metadata


def test_train_two_blocks_and_evaluate(prepared, tmp_path):
    _, ds, cw = prepared
    common = dict(dataset=ds, class_weights=cw, blocks=2, epochs_per_block=1, cfg="yolov5n", weights="", imgsz=64,
                  batch_size=4, workers=1, image_weights=True, hyp_overrides="", seed=0, device="cpu", launcher="local")
    train = train_block.component(IMAGE).python_func
    m0 = _art(Model, tmp_path, "model0")
    train(block=0, model=m0, **common)
    assert load_checkpoint(Path(m0.path) / "weights" / "last.pt")["epoch"] == 0
    metrics, ev = _art(Metrics, tmp_path, "metrics"), _art(Artifact, tmp_path, "evaluation")
    evaluate.component(IMAGE).python_func(model=m0, dataset=ds, block=0, imgsz=64, batch_size=8, device="cpu",
                                          metrics=metrics, evaluation=ev)
    assert set(metrics.metadata) == {"precision", "recall", "map50", "map"}
    maps = json.loads((Path(ev.path) / "maps.json").read_text())["maps"]
    assert len(maps) == 6
    # Pretend the model now detects every class but the rare one, to see the steering.
    (Path(ev.path) / "maps.json").write_text(json.dumps({"maps": [0.9, 0.9, 0.9, 0.9, 0.9, 0.0]}))
    m1 = _art(Model, tmp_path, "model1")
    train(block=1, model=m1, checkpoint=m0, evaluation=ev, **common)
    ck = load_checkpoint(Path(m1.path) / "weights" / "last.pt")
    assert ck["epoch"] == 1
    assert (Path(m1.path) / "evaluations" / "block0" / "metrics.json").is_file()
    assert load_checkpoint(Path(m0.path) / "weights" / "last.pt")["epoch"] == 0  # upstream untouched
    epochs = [json.loads(line) for line in (Path(m1.path) / "image_weights.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[1]["maps"] == [0.9, 0.9, 0.9, 0.9, 0.9, 0.0]
    share = lambda e, c: e["class_draws"][c] / sum(e["class_draws"])  # noqa: E731
    assert share(epochs[1], 5) > share(epochs[0], 5)
    assert m1.metadata["block"] == 1 and "hexagon" in m1.metadata["class_draws_last_epoch"]


def test_train_block_refuses_bad_wiring(prepared, tmp_path):
    _, ds, cw = prepared
    common = dict(dataset=ds, class_weights=cw, blocks=2, epochs_per_block=1, cfg="yolov5n", weights="", imgsz=64,
                  batch_size=4, workers=1, image_weights=True, hyp_overrides="", seed=0, device="cpu",
                  model=_art(Model, tmp_path, "m"))
    train = train_block.component(IMAGE).python_func
    with pytest.raises(ValueError, match="launcher 'cloud'"):
        train(block=0, launcher="cloud", **common)
    with pytest.raises(ValueError, match="needs the previous block's checkpoint"):
        train(block=1, launcher="local", **common)


def test_a_failing_block_fails_the_step_with_the_log_tail(prepared, tmp_path):
    from components.launchers import TrainLaunchError

    _, ds, cw = prepared
    with pytest.raises(TrainLaunchError, match=r"training block 0 failed \(exit status 1\): error: --hyp-override lr0=-1: hyp 'lr0' must be > 0"):
        train_block.component(IMAGE).python_func(
            dataset=ds, class_weights=cw, block=0, blocks=1, epochs_per_block=1, cfg="yolov5n", weights="", imgsz=64,
            batch_size=4, workers=1, image_weights=True, hyp_overrides="lr0=-1", seed=0, device="cpu",
            launcher="local", model=_art(Model, tmp_path, "m"))


def test_train_request_arguments():
    first = TrainRequest(run_dir=Path("/r/block"), data_yaml="/d/data.yaml", block=0, blocks=3, epochs_per_block=4,
                         batch_size=8, world_size=2, class_weights="/cw.json", hyp_overrides=("lr0=0.02",))
    args = first.trainer_args()
    assert args[args.index("--epochs") + 1] == "12" and args[args.index("--stop-epoch") + 1] == "4"
    assert args[args.index("--project") + 1] == "/r" and args[args.index("--name") + 1] == "block"
    assert "--image-weights" in args and args[args.index("--hyp-override") + 1] == "lr0=0.02"
    nxt = TrainRequest(run_dir=Path("/r/b2"), data_yaml="/d/data.yaml", block=2, blocks=3, epochs_per_block=4,
                       maps="/e/maps.json")
    assert nxt.trainer_args()[:2] == ["--resume", "/r/b2/weights/last.pt"]
    assert nxt.trainer_args(run_dir="s3://b/runs/x")[1] == "s3://b/runs/x/weights/last.pt"
    with pytest.raises(ValueError, match="multiple of the world size"):
        TrainRequest(run_dir=Path("/r"), data_yaml="d", block=0, blocks=1, epochs_per_block=1, batch_size=5, world_size=2)
    assert parse_hyp_overrides(" lr0=0.1, mosaic=0 ") == ("lr0=0.1", "mosaic=0")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_hyp_overrides("lr0")
