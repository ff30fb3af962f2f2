"""The compiled pipeline's structure: K unrolled blocks wired by checkpoint and maps."""

from __future__ import annotations

import pytest
import yaml

from pipelines.__main__ import main
from pipelines.kfyolo_pipeline import build_pipeline


def _compile(tmp_path, blocks: int, image: str = "registry.example/kfyolo:1.2.3") -> dict:
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--out", str(out), "--blocks", str(blocks), "--image", image]) == 0
    return yaml.safe_load(out.read_text())


def _producer(task: dict, name: str) -> tuple[str, str]:
    ref = task["inputs"]["artifacts"][name]["taskOutputArtifact"]
    return ref["producerTask"], ref["outputArtifactKey"]


@pytest.mark.parametrize("blocks", [1, 3])
def test_blocks_are_unrolled_and_chained(tmp_path, blocks):
    spec = _compile(tmp_path, blocks)
    tasks = spec["root"]["dag"]["tasks"]
    suffix = lambda k: "" if k == 1 else f"-{k}"  # noqa: E731 - KFP names repeated tasks name, name-2, ...
    trains = [f"train-block{suffix(k)}" for k in range(1, blocks + 1)]
    evals = [f"evaluate{suffix(k)}" for k in range(1, blocks + 1)]
    assert sorted(t for t in tasks if t.startswith("train-block")) == sorted(trains)
    assert sorted(t for t in tasks if t.startswith("evaluate")) == sorted(evals)
    assert "checkpoint" not in tasks[trains[0]]["inputs"].get("artifacts", {})
    for k in range(1, blocks):
        assert _producer(tasks[trains[k]], "checkpoint") == (trains[k - 1], "model")
        assert _producer(tasks[trains[k]], "evaluation") == (evals[k - 1], "evaluation")
        block = tasks[trains[k]]["inputs"]["parameters"]["block"]["runtimeValue"]["constant"]
        assert block == k
    for k in range(blocks):
        assert _producer(tasks[evals[k]], "model") == (trains[k], "model")
        assert _producer(tasks[trains[k]], "dataset") == ("prepare-dataset", "dataset")
        assert _producer(tasks[trains[k]], "class_weights") == ("class-weights", "weights")
    assert _producer(tasks["report"], "model") == (trains[-1], "model")
    assert _producer(tasks["report"], "evaluation") == (evals[-1], "evaluation")
    # The export step: the last block's model as ONNX, its artifacts into the report.
    assert _producer(tasks["export-model"], "model") == (trains[-1], "model")
    assert _producer(tasks["export-model"], "dataset") == ("prepare-dataset", "dataset")
    assert _producer(tasks["report"], "exported_model") == ("export-model", "onnx_model")
    assert _producer(tasks["report"], "exported_predictions") == ("export-model", "predictions")
    outputs = spec["components"]["comp-export-model"]["outputDefinitions"]["artifacts"]
    assert outputs["onnx_model"]["artifactType"]["schemaTitle"] == "system.Model"


def test_every_step_runs_in_the_given_image_and_defaults_are_constants(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-0123456789")
    monkeypatch.setenv("S3_ENDPOINT", "http://minio.example:9000")
    spec = _compile(tmp_path, 2)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/kfyolo:1.2.3"}
    text = (tmp_path / "pipeline.yaml").read_text()
    assert "do-not-leak" not in text and "minio.example" not in text  # nothing from the compiling env
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["data"]["parameterType"] == "STRING" and "defaultValue" not in params["data"]
    assert params["epochs_per_block"]["defaultValue"] == 5 and params["workers"]["defaultValue"] == 2


def test_blocks_must_be_positive():
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        build_pipeline(0)
