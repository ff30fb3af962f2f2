"""One training block as a cluster job: the path a PyTorchJob and a TrainJob share.

The job's pods are not KFP tasks and see no KFP artifacts, so data and checkpoints travel through S3
(staging.py; the run's folder is <s3_prefix>/kfyolo-<run id>/):

  1. stage   the Dataset artifact to <run>/dataset/ (files not there yet), class weights and maps to
             <run>/block<k>/inputs/, and for block k > 0 the previous block's run folder to
             <run>/block<k>/run/, which the trainer resumes;
  2. create  the job (built by its kind's module: pytorchjob.py, trainjob.py). Each node's pod fetches
             the inputs (`python -m components.launchers.staging fetch URI PATH ...`: the trainer
             reads --class-weights and --maps from local files), then runs `torchrun` on the PET_*
             variables its controller injects; rank 0 mirrors the run folder to <run>/block<k>/run/
             after every epoch;
  3. watch   (jobwatch.py) the job's status until it succeeds or fails, streaming the rank-0 node's
             log into the step's log. A failed, deleted or timed-out job raises TrainLaunchError with
             the reason;
  4. fetch   <run>/block<k>/run/ into the step's Model output, so KFP tracks the checkpoint.

The job's name is a function of the run id and the block, so a retried step finds the job its first
attempt created and adopts it instead of starting a second one (a failed one is replaced).
Only building the object and reading its status differ per kind (`JobType`, cluster.JobKind).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from components.launchers import TrainLaunchError, TrainRequest
from components.launchers.cluster import (SPEC_HASH_ANNOTATION, Cluster, ClusterError, JobExists, JobKind,
                                          KubernetesCluster, S3Secret)
from components.launchers.jobwatch import Clock, LogFollower, adopt, watch
from components.launchers.staging import JobPlan, fetch_outputs, stage_inputs
from trainer.storage import S3Uri, Storage, StorageError, is_s3

POD_USER = 10001                # the Dockerfile's non-root user
SCRATCH = "/scratch"            # an emptyDir: dataset cache, run staging, inputs
POD_CACHE = f"{SCRATCH}/kfyolo"  # $KFYOLO_CACHE in the pod
CACHE_VAR = "$KFYOLO_CACHE"     # pod paths under it are expanded by the pod's shell
MAX_NAME = 52                   # pods and services are named <job>-worker-<i> / <job>-node-0-<i>: 52 + 11 <= 63
START_GRACE_S = 600             # the step waits this much longer than the job's active deadline
TORCHRUN = ('torchrun --nnodes "${PET_NNODES}" --nproc_per_node "${PET_NPROC_PER_NODE}" '
            '--node_rank "${PET_NODE_RANK}" --master_addr "${PET_MASTER_ADDR}" --master_port "${PET_MASTER_PORT}"')
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}  # a sidecar never exits, so the job would never finish
_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)([eE]\d+|[KMGTPE]i|[mkMGTPE])?$")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


@dataclass(frozen=True)
class JobOptions:
    """Where and how big the job is; everything a cluster block needs besides the TrainRequest."""

    run_id: str                   # the pipeline run's id; with the block it names the job
    image: str                    # pinned by tag or digest
    s3_prefix: str                # s3://bucket/prefix for staging and the run folders
    namespace: str = ""           # "" = the namespace of the pod this runs in
    nodes: int = 1                # pods: PyTorchJob 1 Master + (nodes - 1) Workers; TrainJob numNodes
    nproc_per_node: int = 1       # processes per pod without GPUs
    gpus_per_node: int = 0        # with GPUs: one process per GPU
    cpu: str = "4"
    memory: str = "16Gi"
    shm_size: str = "2Gi"         # /dev/shm for dataloader workers; counts against `memory`
    secret: S3Secret = field(default_factory=S3Secret)
    keep_job: bool = False
    timeout_s: int = 86400        # the job's activeDeadlineSeconds
    backoff_limit: int = 3        # PyTorchJob only (a TrainJob's runtime decides its retries)
    ttl_s: int = 86400            # PyTorchJob only: a kept job goes this long after it finishes
    poll_s: float = 10.0
    elastic_min: int = 0          # PyTorchJob elasticPolicy: nodes may shrink to this; 0 = not elastic
    elastic_max: int = 0          # ... and grow to this
    runtime: str = "torch-distributed"  # TrainJob only: the ClusterTrainingRuntime it references

    def __post_init__(self) -> None:
        if not re.search(r"[A-Za-z0-9]", self.run_id):
            raise ValueError("run_id is empty: the job's name needs the pipeline run's id")
        name, _, tag = self.image.rpartition(":")
        if "@sha256:" not in self.image and (not name or "/" in tag or tag in ("", "latest")):
            raise ValueError(f"job image {self.image!r} must be pinned by a tag other than 'latest' (or a digest)")
        if not is_s3(self.s3_prefix):
            raise ValueError(f"s3_prefix {self.s3_prefix!r} must be an s3://bucket/prefix location")
        S3Uri.parse(self.s3_prefix)
        if self.nodes < 1 or self.nproc_per_node < 1 or self.gpus_per_node < 0:
            raise ValueError("nodes and nproc_per_node must be >= 1 and gpus_per_node >= 0")
        if self.timeout_s < 1 or self.backoff_limit < 0 or self.ttl_s < 0 or self.poll_s <= 0:
            raise ValueError("timeout_s and poll_s must be positive, backoff_limit and ttl_s >= 0")
        for what, value in (("cpu", self.cpu), ("memory", self.memory), ("shm_size", self.shm_size)):
            if not _QUANTITY.match(value):
                raise ValueError(f"{what} {value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
        if (self.elastic_min or self.elastic_max) and not 1 <= self.elastic_min <= self.nodes <= self.elastic_max:
            raise ValueError(f"elastic nodes {self.elastic_min}:{self.elastic_max} must satisfy "
                             f"1 <= min <= nodes ({self.nodes}) <= max")
        if self.elastic and self.nodes < 2:
            raise ValueError("an elastic PyTorchJob needs nodes >= 2: its rendezvous runs on Worker 0")
        if not _DNS_SUBDOMAIN.fullmatch(self.runtime) or len(self.runtime) > 253:
            raise ValueError(f"runtime {self.runtime!r} is not a Kubernetes object name")

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or self.nproc_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def elastic(self) -> bool:
        return self.elastic_max > 0

    @property
    def node_counts(self) -> range:
        """Every number of nodes the job may run on."""
        return range(self.elastic_min, self.elastic_max + 1) if self.elastic else range(self.nodes, self.nodes + 1)


@dataclass(frozen=True)
class JobType:
    """What differs between job kinds: the API resource and its status (cluster.JobKind), building
    the object from the request (`build(request, opts, plan, namespace)`) and the line that sums it up."""

    kind: JobKind
    build: Callable[[TrainRequest, JobOptions, JobPlan, str], dict[str, Any]]
    summary: Callable[[dict[str, Any]], dict[str, Any]]


def run_key(run_id: str) -> str:
    """'kfyolo-<run id>' as a DNS-1035 label prefix short enough for MAX_NAME with a block suffix."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    if not slug:
        raise ValueError(f"run id {run_id!r} has no letters or digits")
    room = MAX_NAME - len("kfyolo-") - len("-b9999")
    if len(slug) > room:  # keep it unique: a hash of the whole id replaces the cut-off end
        slug = slug[: room - 9].rstrip("-") + "-" + hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return f"kfyolo-{slug}"


def job_name(run_id: str, block: int) -> str:
    """The job's name: the same for every attempt of one run's block, different across runs."""
    return f"{run_key(run_id)}-b{block}"


def plan_for(request: TrainRequest, opts: JobOptions) -> JobPlan:
    stage = f"{opts.s3_prefix.rstrip('/')}/{run_key(opts.run_id)}"
    return JobPlan(job_name(opts.run_id, request.block), stage, request.block)


# ------------------------------------------------------------------------------------ the pod

def pod_inputs(request: TrainRequest, plan: JobPlan) -> tuple[TrainRequest, list[tuple[str, str]]]:
    """The request as the pod sees it (data on S3, inputs under $KFYOLO_CACHE) and the
    (S3 URI, pod path) pairs the pod fetches before torchrun."""
    fetch, paths = [], {}
    for field_name, file in (("class_weights", "class_weights.json"), ("maps", "maps.json")):
        if getattr(request, field_name):
            paths[field_name] = f"{CACHE_VAR}/job-inputs/{file}"
            fetch.append((f"{plan.inputs_uri}/{file}", paths[field_name]))
    return dataclasses.replace(request, data_yaml=f"{plan.dataset_uri}/data.yaml", **paths), fetch


def _word(arg: str) -> str:
    if "$(" in arg:  # Kubernetes would expand $(VAR) in a container command, even inside quotes
        raise ValueError(f"argument {arg!r} contains '$(', which Kubernetes expands in pod commands")
    if arg.startswith(CACHE_VAR + "/"):
        return '"${KFYOLO_CACHE}"/' + shlex.quote(arg[len(CACHE_VAR) + 1:])
    return shlex.quote(arg)


def pod_script(request: TrainRequest, plan: JobPlan) -> str:
    """The `bash -c` script every node runs: fetch the inputs, then torchrun on PET_* variables. The
    explicit flags are what torchrun would read from PET_* anyway; an elastic PyTorchJob's
    PET_RDZV_BACKEND=c10d makes torchrun ignore the node rank and master address."""
    pod_request, fetch = pod_inputs(request, plan)
    lines = ["set -eu"]
    if fetch:
        lines.append("python -m components.launchers.staging fetch " + " ".join(
            f"{_word(uri)} {_word(path)}" for uri, path in fetch))
    args = pod_request.trainer_args(run_dir=plan.run_uri)
    lines.append(f"exec {TORCHRUN} \\\n  -m trainer.train " + " ".join(_word(a) for a in args))
    return "\n".join(lines)


def pod_labels(plan: JobPlan) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kfyolo", "app.kubernetes.io/component": "train-block",
            "kfyolo/block": str(plan.block)}


def pod_env(opts: JobOptions) -> list[Any]:
    """KFYOLO_CACHE, and the S3 variables from the Secret (an endpoint given apart is a plain value)."""
    from kubernetes import client as k

    env = [k.V1EnvVar(name="KFYOLO_CACHE", value=POD_CACHE)]
    env += [k.V1EnvVar(name="S3_ENDPOINT", value=opts.secret.endpoint)] if opts.secret.endpoint else []
    return env + [k.V1EnvVar(name=var, value_from=k.V1EnvVarSource(secret_key_ref=k.V1SecretKeySelector(
        name=opts.secret.name, key=key))) for key, var in opts.secret.keys.items()]


def pod_resources(opts: JobOptions) -> Any:
    from kubernetes import client as k

    limits = {"memory": opts.memory, **({"nvidia.com/gpu": str(opts.gpus_per_node)} if opts.gpus_per_node else {})}
    return k.V1ResourceRequirements(requests={"cpu": opts.cpu, "memory": opts.memory}, limits=limits)


def pod_volumes(opts: JobOptions) -> list[Any]:
    from kubernetes import client as k

    return [k.V1Volume(name="dshm", empty_dir=k.V1EmptyDirVolumeSource(medium="Memory", size_limit=opts.shm_size)),
            k.V1Volume(name="scratch", empty_dir=k.V1EmptyDirVolumeSource())]


def pod_mounts() -> list[Any]:
    from kubernetes import client as k

    return [k.V1VolumeMount(name="dshm", mount_path="/dev/shm"), k.V1VolumeMount(name="scratch", mount_path=SCRATCH)]


def container_security() -> Any:
    """Non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp."""
    from kubernetes import client as k

    return k.V1SecurityContext(allow_privilege_escalation=False, capabilities=k.V1Capabilities(drop=["ALL"]),
                               run_as_non_root=True, run_as_user=POD_USER, run_as_group=POD_USER,
                               seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault"))


def pod_security() -> Any:
    from kubernetes import client as k

    return k.V1PodSecurityContext(run_as_non_root=True, run_as_user=POD_USER, run_as_group=POD_USER,
                                  fs_group=POD_USER, seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault"))


def serialize(obj: Any) -> Any:
    """A kubernetes client model (or a structure of them) as the JSON the API takes."""
    from kubernetes import client as k

    return k.ApiClient().sanitize_for_serialization(obj)


def annotated(body: dict[str, Any]) -> dict[str, Any]:
    """The job with a hash of its spec: how a retried step tells its own job from a stranger's."""
    body["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = spec_hash(body["spec"])
    return body


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ the run

def _printer(log: TextIO, echo: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        log.write(text + "\n")
        log.flush()
        if echo:
            print(text, flush=True)
    return say


def run_job(job_type: JobType, request: TrainRequest, opts: JobOptions, dataset_dir: Path,
            cluster: Cluster | None = None, storage: Storage | None = None, clock: Clock = Clock(),
            echo: bool = True) -> JobPlan:
    """Run the block as a job of `job_type` and leave its run folder in request.run_dir (see the module
    docstring). The log goes to run_dir/train_block{k}.log and, with `echo`, to the step's log."""
    kind = job_type.kind.kind
    if request.world_size != opts.world_size:
        raise ValueError(f"request world size {request.world_size} != {opts.nodes} node(s) x "
                         f"{opts.procs_per_node} process(es)")
    for nodes in opts.node_counts:  # an elastic job's world size changes with its node count
        if request.batch_size % (nodes * opts.procs_per_node):
            raise ValueError(f"batch size {request.batch_size} must be a multiple of the world size on "
                             f"{nodes} node(s) ({nodes * opts.procs_per_node})")
    plan = plan_for(request, opts)
    storage = storage or Storage.from_env()
    request.run_dir.mkdir(parents=True, exist_ok=True)
    with (request.run_dir / f"train_block{request.block}.log").open("a") as log:
        say = _printer(log, echo)
        try:
            cluster = cluster or KubernetesCluster.connect(opts.namespace, kind=job_type.kind)
            job = job_type.build(request, opts, plan, cluster.namespace)
            _start(cluster, job, job_type, request, plan, dataset_dir, storage, say, clock, opts.poll_s)
            try:
                watch(cluster, plan.name, opts.timeout_s + START_GRACE_S, opts.poll_s, LogFollower(say), clock,
                      kind=kind)
            finally:
                _finish(cluster, plan.name, opts.keep_job, say, job_type.kind)
            say(f"[kfyolo] fetching {plan.run_uri} into the Model output")
            fetch_outputs(storage, request, plan, kind)
        except (ClusterError, StorageError) as e:
            raise TrainLaunchError(f"training block {request.block} ({kind} {plan.name}): {e}") from e
    return plan


def _start(cluster: Cluster, job: dict[str, Any], job_type: JobType, request: TrainRequest, plan: JobPlan,
           dataset_dir: Path, storage: Storage, say: Callable[[str], None], clock: Clock, poll_s: float) -> None:
    """Adopt this block's job if an earlier attempt made it; else stage the inputs and create it."""
    if adopt(cluster, job, say, clock, poll_s):
        return
    say(f"[kfyolo] staging block {request.block}'s inputs under {plan.stage}")
    stage_inputs(storage, request, plan, dataset_dir)
    try:
        cluster.create(job)
    except JobExists:  # another attempt created it between our look and our create
        if not adopt(cluster, job, say, clock, poll_s):
            raise
        return
    say(f"[kfyolo] created {job['kind']} {cluster.namespace}/{plan.name}: {json.dumps(job_type.summary(job))}")


def _finish(cluster: Cluster, name: str, keep: bool, say: Callable[[str], None], kind: JobKind) -> None:
    if keep:
        later = "its TTL removes it later" if kind.kind == "PyTorchJob" else "delete it when done"
        say(f"[kfyolo] keeping {kind.kind} {cluster.namespace}/{name} (kubectl -n {cluster.namespace} "
            f"describe {kind.kind.lower()} {name}); {later}")
        return
    try:
        cluster.delete(name)
        say(f"[kfyolo] deleted {kind.kind} {cluster.namespace}/{name}")
    except ClusterError as e:  # the outcome is known; a leftover job is a nuisance, not a failure
        say(f"[kfyolo] warning: could not delete {kind.kind} {name}: {e}")
