"""The TrainJob launcher: one training block as a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1).

A TrainJob names a ClusterTrainingRuntime (default `torch-distributed`) and says only what differs
from it: `spec.trainer` (image, command, env, numNodes, numProcPerNode, resourcesPerNode) and
`spec.runtimePatches` for what the trainer block has no field for (the pod's securityContext and
volumes, the `node` container's securityContext and mounts, pod labels and annotations). Trainer v2
runs it as a JobSet of Indexed Jobs and injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR=<job>-node-0-0.<job> and PET_MASTER_PORT=29500 into the container `node`, which
we may not set ourselves; the pod script is the PyTorchJob's (clusterjob.pod_script), and so is the
rest of the path (clusterjob.run_job). Not here, unlike a PyTorchJob: a TTL after finishing, a
backoff limit of our own (the runtime's JobSet decides retries) and an elastic mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.launchers import TrainRequest
from components.launchers.cluster import TRAINJOB, Cluster
from components.launchers.clusterjob import (POD_ANNOTATIONS, JobOptions, JobType, annotated, container_security,
                                             pod_env, pod_labels, pod_mounts, pod_resources, pod_script,
                                             pod_security, pod_volumes, run_job, serialize)
from components.launchers.staging import JobPlan
from components.launchers.jobwatch import Clock
from trainer.storage import Storage

DEFAULT_RUNTIME = "torch-distributed"
NODE = "node"                   # the torch runtime's replicated job and its training container
PATCH_MANAGER = "kfyolo.io/train-block"  # who owns our runtimePatches entry (the list is keyed by it)


def check_options(opts: JobOptions) -> None:
    """What a TrainJob cannot do of the shared options (ValueError)."""
    if opts.elastic:
        raise ValueError("Trainer v2 has no elastic mode (TrainJob has no elasticPolicy); use --launcher "
                         "pytorchjob for an elastic job")


def build_job(request: TrainRequest, opts: JobOptions, plan: JobPlan, namespace: str) -> dict[str, Any]:
    """The TrainJob manifest (a dict) for this block, annotated with a hash of its spec."""
    check_options(opts)
    container = {"name": NODE, "securityContext": serialize(container_security()),
                 "volumeMounts": serialize(pod_mounts())}
    pod = {"metadata": {"labels": pod_labels(plan), "annotations": dict(POD_ANNOTATIONS)},
           "spec": {"securityContext": serialize(pod_security()), "volumes": serialize(pod_volumes(opts)),
                    "containers": [container]}}
    # The training operator sets PYTHONUNBUFFERED in a PyTorchJob's pods; Trainer v2 does not, and a
    # block-buffered log would reach the step's log in lumps.
    env = serialize(pod_env(opts)) + [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": NODE, "template": {"spec": {"template": pod}}}]}}}}
    spec = {"runtimeRef": {"name": opts.runtime, "apiGroup": TRAINJOB.group, "kind": "ClusterTrainingRuntime"},
            "trainer": {"image": opts.image, "command": ["bash", "-c", pod_script(request, plan)],
                        "env": env, "numNodes": opts.nodes,
                        "numProcPerNode": opts.procs_per_node, "resourcesPerNode": serialize(pod_resources(opts))},
            "runtimePatches": [patch],
            "activeDeadlineSeconds": opts.timeout_s}
    return annotated({"apiVersion": f"{TRAINJOB.group}/{TRAINJOB.version}", "kind": TRAINJOB.kind,
                      "metadata": {"name": plan.name, "namespace": namespace, "labels": pod_labels(plan)},
                      "spec": spec})


def summary(job: dict[str, Any]) -> dict[str, Any]:
    trainer = job["spec"]["trainer"]
    return {"runtime": job["spec"]["runtimeRef"]["name"], "numNodes": trainer["numNodes"],
            "numProcPerNode": trainer["numProcPerNode"], "image": trainer["image"]}


TRAINJOB_TYPE = JobType(TRAINJOB, build_job, summary)


def run_trainjob(request: TrainRequest, opts: JobOptions, dataset_dir: Path, cluster: Cluster | None = None,
                 storage: Storage | None = None, clock: Clock = Clock(), echo: bool = True) -> JobPlan:
    """Run the block as a TrainJob and leave its run folder in request.run_dir (clusterjob.run_job)."""
    check_options(opts)
    return run_job(TRAINJOB_TYPE, request, opts, dataset_dir, cluster, storage, clock, echo)
