"""The PyTorchJob pod contract, for real: the launcher stages a block on S3 (moto on loopback) and
creates its job; every replica of the generated job runs as a local process with exactly the
environment the training operator injects plus the container's own env (the S3 variables resolved
from the Secret it names), running the container's command verbatim. The job trains across the
replicas and leaves its run folder on S3, from where the launcher fetches it into the Model output.
Then block 1 resumes it the same way on one node (a world size change between blocks)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fake_cluster import ProcessCluster
from s3server import free_port

from components.launchers import TrainRequest, seed_block_folder
from components.launchers.pytorchjob import JobOptions, build_job, plan_for, run_pytorchjob
from trainer.checkpoint import load_checkpoint
from trainer.data.prepare import class_weight_record
from trainer.storage import RetryPolicy, Storage


def _secret() -> dict[str, dict[str, str]]:
    """The Secret the job's env refers to, holding the moto endpoint and keys of the `s3` fixture."""
    return {"kfyolo-s3": {k: os.environ[k] for k in ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}


@pytest.mark.timeout(420)
def test_two_replicas_train_a_block_through_s3_and_one_resumes_it(s3, tmp_path, synthetic_yaml):
    if shutil.which("torchrun", path=str(Path(os.sys.executable).parent)) is None:
        pytest.skip(f"torchrun is not installed beside {os.sys.executable}")
    dataset = synthetic_yaml.parent
    cw = tmp_path / "class_weights.json"
    cw.write_text(json.dumps(class_weight_record(synthetic_yaml)))
    storage = Storage.from_env(RetryPolicy(attempts=2, base_delay=0.05))
    common = dict(data_yaml=str(synthetic_yaml), blocks=3, epochs_per_block=1, imgsz=64, batch_size=4,
                  class_weights=str(cw), workers=0, device="cpu")
    opts = JobOptions(run_id="8d0c6a1e-run", image="registry.example/kfyolo:0.1.0", s3_prefix="s3://kfyolo/jobs",
                      nodes=2, poll_s=0.25)

    first = TrainRequest(run_dir=tmp_path / "model0", block=0, world_size=2, **common)
    cluster = ProcessCluster(tmp_path / "pods", _secret(), free_port())
    plan = run_pytorchjob(first, opts, dataset, cluster=cluster, storage=storage, echo=False)

    job = build_job(first, opts, plan, cluster.namespace)
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["bash", "-c"] and 'exec torchrun --nnodes "${PET_NNODES}"' in command[2]
    envs = cluster.envs[plan.name]
    assert [(e["PET_NODE_RANK"], e["RANK"], e["PET_NNODES"], e["WORLD_SIZE"]) for e in envs] == [
        ("0", "0", "2", "2"), ("1", "1", "2", "2")]
    assert all(e["S3_ENDPOINT"] == os.environ["S3_ENDPOINT"] and e["KFYOLO_CACHE"].startswith(str(tmp_path))
               for e in envs)
    master_log = cluster.master_log(plan.name)
    assert "rank 0/2 joined gloo process group" in master_log
    assert ("delete", plan.name) in cluster.calls  # keep_job=False
    # The run folder reached S3 and came back into the Model output.
    assert storage.exists(f"{plan.run_uri}/weights/last.pt")
    ckpt = load_checkpoint(first.run_dir / "weights" / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["opt"]["data"] == f"{plan.dataset_uri}/data.yaml"
    record = json.loads((first.run_dir / "image_weights.jsonl").read_text().splitlines()[-1])
    assert sum(record["class_draws"]) > 0
    step_log = (first.run_dir / "train_block0.log").read_text()
    assert f"created PyTorchJob local/{plan.name}" in step_log and "rank 0/2 joined gloo process group" in step_log

    # Block 1 on one node resumes block 0 from S3, steered by an evaluation's maps.
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "maps.json").write_text(json.dumps({"maps": [0.9, 0.9, 0.9, 0.9, 0.9, 0.0]}))
    second = TrainRequest(run_dir=tmp_path / "model1", block=1, world_size=1, maps=str(evaluation / "maps.json"),
                          **common)
    seed_block_folder(second.run_dir, first.run_dir, evaluation, 1)
    one_node = JobOptions(**{**opts.__dict__, "nodes": 1})
    plan1 = run_pytorchjob(second, one_node, dataset, cluster=cluster, storage=storage, echo=False)
    assert plan1.name == plan.name[:-1] + "1" and plan1.stage == plan.stage
    step_log = (second.run_dir / "train_block1.log").read_text()  # intact after the folder came back
    assert "created PyTorchJob" in step_log and step_log.rstrip().endswith("into the Model output")
    assert (second.run_dir / "train_block0.log").read_text() == (first.run_dir / "train_block0.log").read_text()
    ckpt = load_checkpoint(second.run_dir / "weights" / "last.pt")
    assert ckpt["epoch"] == 1
    epochs = [json.loads(line) for line in (second.run_dir / "image_weights.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and epochs[1]["maps"] == [0.9, 0.9, 0.9, 0.9, 0.9, 0.0]
    assert (second.run_dir / "evaluations" / "block0" / "maps.json").is_file()
    assert load_checkpoint(first.run_dir / "weights" / "last.pt")["epoch"] == 0  # upstream untouched
    assert plan_for(second, one_node).run_uri.endswith("/block1/run")
