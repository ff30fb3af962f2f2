"""The PyTorchJob launcher: one training block as a Kubeflow training-operator PyTorchJob (kubeflow.org/v1).

The operator is v1, now legacy beside Kubeflow Trainer v2 (trainjob.py); both share clusterjob.py's
path (staging, adopting, watching, log following, fetching). What is PyTorchJob's own is here:
Master + (nodes - 1) Workers whose container `pytorch` gets the operator's PET_* variables, the
run policy, and, optionally, an elasticPolicy (c10d rendezvous on Worker 0, between `elastic_min`
and `elastic_max` nodes; Trainer v2 has no elastic mode yet).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from components.launchers import TrainRequest
from components.launchers.cluster import CONTAINER, GROUP, KIND, PYTORCHJOB, VERSION, Cluster
# JobOptions, JobPlan, POD_USER, job_name, plan_for and main are imported from here too (they lived here
# before the path was shared).
from components.launchers.clusterjob import (POD_ANNOTATIONS, POD_USER, JobOptions, JobType, annotated,  # noqa: F401
                                             container_security, job_name, plan_for, pod_env, pod_labels, pod_mounts,
                                             pod_resources, pod_script, pod_security, pod_volumes, run_job, serialize)
from components.launchers.staging import JobPlan, main  # noqa: F401
from components.launchers.jobwatch import Clock
from trainer.storage import Storage

MASTER_PORT = 23456             # the training operator's default, declared so it need not guess
ELASTIC_MAX_RESTARTS = 3        # torchrun restarts the worker group this often (e.g. when nodes come or go)


def pod_template(script: str, opts: JobOptions, plan: JobPlan) -> Any:
    """The replicas' pod: container `pytorch`, non-root, /dev/shm in memory, S3 variables from the Secret."""
    from kubernetes import client as k

    container = k.V1Container(
        name=CONTAINER, image=opts.image, image_pull_policy="IfNotPresent", command=["bash", "-c", script],
        env=pod_env(opts), ports=[k.V1ContainerPort(name="pytorchjob-port", container_port=MASTER_PORT,
                                                    protocol="TCP")],
        resources=pod_resources(opts), volume_mounts=pod_mounts(), security_context=container_security())
    return k.V1PodTemplateSpec(
        metadata=k.V1ObjectMeta(labels=pod_labels(plan), annotations=dict(POD_ANNOTATIONS)),
        spec=k.V1PodSpec(containers=[container], security_context=pod_security(), volumes=pod_volumes(opts)))


def build_job(request: TrainRequest, opts: JobOptions, plan: JobPlan, namespace: str) -> dict[str, Any]:
    """The PyTorchJob manifest (a dict) for this block, annotated with a hash of its spec."""
    from kubeflow.training import (KubeflowOrgV1ElasticPolicy, KubeflowOrgV1PyTorchJob, KubeflowOrgV1PyTorchJobSpec,
                                   KubeflowOrgV1ReplicaSpec, KubeflowOrgV1RunPolicy)
    from kubernetes import client as k

    template = pod_template(pod_script(request, plan), opts, plan)
    # ExitCode: errors (exit 1-127) fail the job at once; signals (preemption, OOM kill) restart the pod.
    replicas = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="ExitCode", template=template)}
    if opts.nodes > 1:
        replicas["Worker"] = KubeflowOrgV1ReplicaSpec(replicas=opts.nodes - 1, restart_policy="ExitCode",
                                                      template=template)
    # The operator sets PET_NNODES=min:max, PET_RDZV_BACKEND and PET_RDZV_ENDPOINT=<job>-worker-0:<port>;
    # min and max count every pod that joins the rendezvous, the Master too.
    elastic = KubeflowOrgV1ElasticPolicy(min_replicas=opts.elastic_min, max_replicas=opts.elastic_max,
                                         rdzv_backend="c10d", max_restarts=ELASTIC_MAX_RESTARTS) \
        if opts.elastic else None
    job = KubeflowOrgV1PyTorchJob(
        api_version=f"{GROUP}/{VERSION}", kind=KIND,
        metadata=k.V1ObjectMeta(name=plan.name, namespace=namespace, labels=pod_labels(plan)),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(opts.procs_per_node), pytorch_replica_specs=replicas, elastic_policy=elastic,
            run_policy=KubeflowOrgV1RunPolicy(clean_pod_policy="Running", backoff_limit=opts.backoff_limit,
                                              ttl_seconds_after_finished=opts.ttl_s,
                                              active_deadline_seconds=opts.timeout_s)))
    return annotated(serialize(job))


def summary(job: dict[str, Any]) -> dict[str, Any]:
    specs = job["spec"]["pytorchReplicaSpecs"]
    out = {"replicas": {k: v["replicas"] for k, v in specs.items()}, "nprocPerNode": job["spec"]["nprocPerNode"],
           "image": specs["Master"]["template"]["spec"]["containers"][0]["image"]}
    if "elasticPolicy" in job["spec"]:
        policy = job["spec"]["elasticPolicy"]
        out["elastic"] = f"{policy['minReplicas']}:{policy['maxReplicas']}"
    return out


PYTORCHJOB_TYPE = JobType(PYTORCHJOB, build_job, summary)


def run_pytorchjob(request: TrainRequest, opts: JobOptions, dataset_dir: Path, cluster: Cluster | None = None,
                   storage: Storage | None = None, clock: Clock = Clock(), echo: bool = True) -> JobPlan:
    """Run the block as a PyTorchJob and leave its run folder in request.run_dir (clusterjob.run_job)."""
    return run_job(PYTORCHJOB_TYPE, request, opts, dataset_dir, cluster, storage, clock, echo)


if __name__ == "__main__":  # the staging CLI under its older name (README, "kubectl only")
    sys.exit(main(prog="python -m components.launchers.pytorchjob"))
