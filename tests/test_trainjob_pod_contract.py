"""The TrainJob pod contract, for real: the launcher stages a block on S3 (moto on loopback) and creates
its TrainJob; the job's one node runs as a local process with exactly the variables Kubeflow Trainer
v2 injects into the container `node` (PET_NNODES=1, PET_NPROC_PER_NODE=2, PET_NODE_RANK=0,
PET_MASTER_ADDR=127.0.0.1, a free PET_MASTER_PORT; no MASTER_ADDR, RANK or WORLD_SIZE) plus the
trainer's own env (the S3 variables resolved from the Secret it names), running `spec.trainer.command`
verbatim. torchrun starts two gloo processes from the PET_* variables alone; they train one tiny epoch
and leave the run folder on S3, from where the launcher fetches it into the Model output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fake_cluster import TORCH_RESERVED_ENV, ProcessCluster
from s3server import free_port

from components.launchers import TrainRequest
from components.launchers.clusterjob import JobOptions
from components.launchers.trainjob import run_trainjob
from trainer.checkpoint import load_checkpoint
from trainer.data.prepare import class_weight_record
from trainer.storage import RetryPolicy, Storage


@pytest.mark.timeout(420)  # as the PyTorchJob contract: a loaded 2-core machine is slow
def test_one_node_two_processes_train_a_block_from_the_pet_variables_through_s3(s3, tmp_path, synthetic_yaml):
    if shutil.which("torchrun", path=str(Path(os.sys.executable).parent)) is None:
        pytest.skip(f"torchrun is not installed beside {os.sys.executable}")
    cw = tmp_path / "class_weights.json"
    cw.write_text(json.dumps(class_weight_record(synthetic_yaml)))
    storage = Storage.from_env(RetryPolicy(attempts=2, base_delay=0.05))
    request = TrainRequest(run_dir=tmp_path / "model0", data_yaml=str(synthetic_yaml), block=0, blocks=1,
                           epochs_per_block=1, imgsz=64, batch_size=4, class_weights=str(cw), workers=0, device="cpu",
                           world_size=2)
    opts = JobOptions(run_id="5e1f-trainjob-run", image="registry.example/kfyolo:0.1.0", s3_prefix="s3://kfyolo/jobs",
                      nodes=1, nproc_per_node=2, poll_s=0.25)
    secret = {"kfyolo-s3": {k: os.environ[k] for k in ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    cluster = ProcessCluster(tmp_path / "pods", secret, free_port())
    plan = run_trainjob(request, opts, synthetic_yaml.parent, cluster=cluster, storage=storage, echo=False)

    (env,) = cluster.envs[plan.name]
    assert {k: env[k] for k in TORCH_RESERVED_ENV} == {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2",
                                                       "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1",
                                                       "PET_MASTER_PORT": str(cluster.port)}
    assert not {"MASTER_ADDR", "RANK", "WORLD_SIZE"} & set(env)  # the training operator's, not Trainer v2's
    assert env["AWS_SECRET_ACCESS_KEY"] == os.environ["AWS_SECRET_ACCESS_KEY"]  # from the Secret it names
    assert env["PYTHONUNBUFFERED"] == "1"  # the TrainJob's own: Trainer v2 does not set it
    node_log = cluster.master_log(plan.name)
    assert "rank 0/2 joined gloo process group" in node_log, node_log[-3000:]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in node_log
    assert ("delete", plan.name) in cluster.calls
    assert storage.exists(f"{plan.run_uri}/weights/last.pt")
    ckpt = load_checkpoint(request.run_dir / "weights" / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["opt"]["data"] == f"{plan.dataset_uri}/data.yaml"
    step_log = (request.run_dir / "train_block0.log").read_text()
    assert f"created TrainJob local/{plan.name}" in step_log and "rank 0/2 joined gloo process group" in step_log
    assert step_log.rstrip().endswith("into the Model output")
