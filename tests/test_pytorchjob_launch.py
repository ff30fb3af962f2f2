"""The PyTorchJob pod contract on one machine: two "nodes", each a torchrun started with exactly the
variables the Kubeflow training operator injects, running the pod command on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.checkpoint import load_checkpoint
from trainer.train import main

ROOT = Path(__file__).resolve().parents[1]
POD_COMMAND = ("torchrun --nnodes $PET_NNODES --nproc_per_node $PET_NPROC_PER_NODE --node_rank $PET_NODE_RANK "
               "--master_addr $PET_MASTER_ADDR --master_port $PET_MASTER_PORT -m trainer.train "
               "--data {data} --cfg yolov5n --imgsz 64 --epochs 2 --stop-epoch 1 --batch-size 4 --workers 0 --image-weights "
               "--device cpu --project {project} --name job --exist-ok")


def operator_env(node_rank: int, nodes: int, port: int) -> dict[str, str]:
    """What the training operator sets in replica `node_rank` (Master is 0, Workers 1..)."""
    return {"MASTER_ADDR": "localhost", "MASTER_PORT": str(port), "WORLD_SIZE": str(nodes),
            "RANK": str(node_rank), "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(node_rank), "PET_MASTER_ADDR": "localhost", "PET_MASTER_PORT": str(port)}


def test_two_node_pod_command_trains_a_block_that_one_process_resumes(tmp_path, synthetic_yaml):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun is not installed beside {sys.executable}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = POD_COMMAND.format(data=synthetic_yaml, project=tmp_path)
    path = f"{torchrun.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    pods = [subprocess.Popen(["bash", "-c", command], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env={**base, "PATH": path, "OMP_NUM_THREADS": "1",
                                                           **operator_env(r, 2, port)})
            for r in range(2)]
    logs = []
    try:
        for pod in pods:
            logs.append(pod.communicate(timeout=300)[0])
    finally:
        for pod in pods:
            pod.kill()
    assert [p.returncode for p in pods] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "rank 0/2 joined gloo process group" in logs[0]
    run = tmp_path / "job"
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["opt"]["batch_size"] == 4
    record = json.loads((run / "image_weights.jsonl").read_text())
    assert sum(record["class_draws"]) > 0
    assert not (tmp_path / "job2").exists()  # rank 1 did not make a run folder of its own

    # The next block runs at another world size (one process), resuming the job's checkpoint.
    assert main(["--resume", str(run / "weights" / "last.pt"), "--workers", "0"]) == 0
    assert load_checkpoint(run / "weights" / "last.pt")["epoch"] == 1
    assert (run / "results.csv").read_text().count("\n") == 3  # header + one row per block
