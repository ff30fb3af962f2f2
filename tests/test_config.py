"""Hyperparameter and option loading: shipped files, overrides, and rejected values."""

import pytest

from trainer.config import ConfigError, Hyp, TrainOptions, load_hyp, parse_overrides


def test_shipped_scratch_yaml_equals_the_dataclass_defaults():
    assert load_hyp("hyp.scratch") == Hyp()
    assert load_hyp(None) == Hyp()


def test_finetune_and_overrides():
    hyp = load_hyp("hyp.finetune", {"lr0": 0.02, "mosaic": 0})
    assert hyp.lr0 == 0.02 and hyp.mosaic == 0.0 and hyp.lrf == 0.12


def test_yaml_file(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text("lr0: 0.005\nfliplr: 0.0\n")
    hyp = load_hyp(p)
    assert hyp.lr0 == 0.005 and hyp.fliplr == 0.0 and hyp.momentum == Hyp().momentum


@pytest.mark.parametrize("values,match", [
    ({"lr_0": 0.1}, "--hyp-override lr_0: unknown hyperparameter"),
    ({"lr0": -1}, "--hyp-override lr0=-1: hyp 'lr0' must be > 0"),
    ({"mosaic": 1.5}, "'mosaic' must be in \\[0, 1\\]"),
    ({"box": "big"}, "'box' must be a finite number"),
    ({"obj": float("nan")}, "'obj' must be a finite number"),
])
def test_bad_hyp_values_name_the_key(tmp_path, values, match):
    with pytest.raises(ConfigError, match=match):
        load_hyp(None, values)


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text("lr0: 0.01\nmomentun: 0.9\n")
    with pytest.raises(ConfigError, match="h.yaml: unknown hyperparameters \\['momentun'\\]"):
        load_hyp(p)


def test_missing_hyp_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_hyp("missing.yaml")


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["lr0=0.1", "mosaic=0", "lrf=1e-5", "name=abc"]) == {
        "lr0": 0.1, "mosaic": 0, "lrf": 1e-5, "name": "abc"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr0"])


@pytest.mark.parametrize("changes,match", [
    ({"epochs": 0}, "--epochs"), ({"batch_size": 0}, "--batch-size"), ({"imgsz": 16}, "--imgsz"),
    ({"optimizer": "RMSprop"}, "--optimizer"), ({"amp": "fp8"}, "--amp"),
    ({"rect": True, "image_weights": True}, "--rect and --image-weights"),
    ({"stop_epoch": 11}, "--stop-epoch"), ({"data": ""}, "--data is required"),
])
def test_incompatible_or_bad_options(changes, match):
    with pytest.raises(ConfigError, match=match):
        TrainOptions(**{"data": "d.yaml", "epochs": 10, **changes})


def test_options_round_trip():
    opt = TrainOptions(data="d.yaml", hyp_overrides=(("lr0", 0.1),))
    assert TrainOptions.from_dict(opt.to_dict()) == opt
    with pytest.raises(ConfigError, match="unknown options"):
        TrainOptions.from_dict({**opt.to_dict(), "bogus": 1})
