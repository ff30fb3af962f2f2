"""The PyTorchJob launcher: one training block as a Kubeflow PyTorchJob (kubeflow.org/v1).

The job's pods are not KFP tasks and see no KFP artifacts, so data and checkpoints travel through S3
(the run's folder is <s3_prefix>/kfyolo-<run id>/):

  1. stage   the Dataset artifact to <run>/dataset/ (files not there yet), class weights and maps to
             <run>/block<k>/inputs/, and for block k > 0 the previous block's run folder to
             <run>/block<k>/run/, which the trainer resumes;
  2. create  Master + (nodes - 1) Workers. Each pod fetches the inputs (`python -m
             components.launchers.pytorchjob fetch URI PATH ...`: the trainer reads --class-weights
             and --maps from local files), then runs `torchrun` with the operator's PET_* variables;
             rank 0 mirrors the run folder to <run>/block<k>/run/ after every epoch;
  3. watch   (jobwatch.py) the job's conditions until Succeeded or Failed, streaming the master's log into the
             step's log. A failed, deleted or timed-out job raises TrainLaunchError with the reason;
  4. fetch   <run>/block<k>/run/ into the step's Model output, so KFP tracks the checkpoint.

The job's name is a function of the run id and the block, so a retried step finds the job its first
attempt created and adopts it instead of starting a second one (a failed one is replaced).
Kubernetes and kubeflow-training are imported where used: the pod's `fetch` step needs neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from components.launchers import TrainLaunchError, TrainRequest
from components.launchers.cluster import (CONTAINER, GROUP, KIND, SPEC_HASH_ANNOTATION, VERSION, Cluster,
                                          ClusterError, JobExists, KubernetesCluster, S3Secret)
from components.launchers.jobwatch import Clock, LogFollower, adopt, watch
from trainer.storage import S3Uri, Storage, StorageError, is_s3

POD_USER = 10001                # the Dockerfile's non-root user
SCRATCH = "/scratch"            # an emptyDir: dataset cache, run staging, inputs
POD_CACHE = f"{SCRATCH}/kfyolo"  # $KFYOLO_CACHE in the pod
CACHE_VAR = "$KFYOLO_CACHE"     # pod paths under it are expanded by the pod's shell
MASTER_PORT = 23456             # the training operator's default, declared so it need not guess
MAX_NAME = 52                   # the operator names pods and services <job>-worker-<i>: 52 + 11 <= 63
START_GRACE_S = 600             # the step waits this much longer than activeDeadlineSeconds
TORCHRUN = ('torchrun --nnodes "${PET_NNODES}" --nproc_per_node "${PET_NPROC_PER_NODE}" '
            '--node_rank "${PET_NODE_RANK}" --master_addr "${PET_MASTER_ADDR}" --master_port "${PET_MASTER_PORT}"')
_QUANTITY = re.compile(r"^(\d+(\.\d+)?|\.\d+)([eE]\d+|[KMGTPE]i|[mkMGTPE])?$")


@dataclass(frozen=True)
class JobOptions:
    """Where and how big the job is; everything a cluster block needs besides the TrainRequest."""

    run_id: str                   # the pipeline run's id; with the block it names the job
    image: str                    # pinned by tag or digest
    s3_prefix: str                # s3://bucket/prefix for staging and the run folders
    namespace: str = ""           # "" = the namespace of the pod this runs in
    nodes: int = 1                # pods: 1 Master + (nodes - 1) Workers
    nproc_per_node: int = 1       # processes per pod without GPUs
    gpus_per_node: int = 0        # with GPUs: one process per GPU
    cpu: str = "4"
    memory: str = "16Gi"
    shm_size: str = "2Gi"         # /dev/shm for dataloader workers; counts against `memory`
    secret: S3Secret = field(default_factory=S3Secret)
    keep_job: bool = False
    timeout_s: int = 86400        # runPolicy.activeDeadlineSeconds
    backoff_limit: int = 3
    ttl_s: int = 86400            # a kept job goes this long after it finishes
    poll_s: float = 10.0

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

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or self.nproc_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(frozen=True)
class JobPlan:
    """The name and S3 locations of one block's job."""

    name: str
    stage: str                    # s3://bucket/prefix/kfyolo-<run>: shared by the run's blocks
    block: int

    @property
    def dataset_uri(self) -> str:
        return f"{self.stage}/dataset"

    @property
    def inputs_uri(self) -> str:
        return f"{self.stage}/block{self.block}/inputs"

    @property
    def run_uri(self) -> str:
        return f"{self.stage}/block{self.block}/run"


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


# ------------------------------------------------------------------------------------ the job

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
    """The `bash -c` script every replica runs: fetch the inputs, then torchrun on PET_* variables."""
    pod_request, fetch = pod_inputs(request, plan)
    lines = ["set -eu"]
    if fetch:
        lines.append("python -m components.launchers.pytorchjob fetch " + " ".join(
            f"{_word(uri)} {_word(path)}" for uri, path in fetch))
    args = pod_request.trainer_args(run_dir=plan.run_uri)
    lines.append(f"exec {TORCHRUN} \\\n  -m trainer.train " + " ".join(_word(a) for a in args))
    return "\n".join(lines)


def _labels(plan: JobPlan) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kfyolo", "app.kubernetes.io/component": "train-block",
            "kfyolo/block": str(plan.block)}


def pod_template(script: str, opts: JobOptions, plan: JobPlan) -> Any:
    """The replicas' pod: container `pytorch`, non-root, /dev/shm in memory, S3 variables from the Secret."""
    from kubernetes import client as k

    env = [k.V1EnvVar(name="KFYOLO_CACHE", value=POD_CACHE)]
    env += [k.V1EnvVar(name="S3_ENDPOINT", value=opts.secret.endpoint)] if opts.secret.endpoint else []
    env += [k.V1EnvVar(name=var, value_from=k.V1EnvVarSource(secret_key_ref=k.V1SecretKeySelector(
        name=opts.secret.name, key=key))) for key, var in opts.secret.keys.items()]
    limits = {"memory": opts.memory, **({"nvidia.com/gpu": str(opts.gpus_per_node)} if opts.gpus_per_node else {})}
    seccomp = k.V1SeccompProfile(type="RuntimeDefault")
    container = k.V1Container(
        name=CONTAINER, image=opts.image, image_pull_policy="IfNotPresent", command=["bash", "-c", script], env=env,
        ports=[k.V1ContainerPort(name="pytorchjob-port", container_port=MASTER_PORT, protocol="TCP")],
        resources=k.V1ResourceRequirements(requests={"cpu": opts.cpu, "memory": opts.memory}, limits=limits),
        volume_mounts=[k.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
                       k.V1VolumeMount(name="scratch", mount_path=SCRATCH)],
        security_context=k.V1SecurityContext(
            allow_privilege_escalation=False, capabilities=k.V1Capabilities(drop=["ALL"]), run_as_non_root=True,
            run_as_user=POD_USER, run_as_group=POD_USER, seccomp_profile=seccomp))
    return k.V1PodTemplateSpec(
        # An Istio sidecar never exits, so the job would never finish: keep it out.
        metadata=k.V1ObjectMeta(labels=_labels(plan), annotations={"sidecar.istio.io/inject": "false"}),
        spec=k.V1PodSpec(
            containers=[container],
            security_context=k.V1PodSecurityContext(run_as_non_root=True, run_as_user=POD_USER, run_as_group=POD_USER,
                                                    fs_group=POD_USER, seccomp_profile=seccomp),
            volumes=[k.V1Volume(name="dshm", empty_dir=k.V1EmptyDirVolumeSource(medium="Memory",
                                                                                 size_limit=opts.shm_size)),
                     k.V1Volume(name="scratch", empty_dir=k.V1EmptyDirVolumeSource())]))


def build_job(request: TrainRequest, opts: JobOptions, plan: JobPlan, namespace: str) -> dict[str, Any]:
    """The PyTorchJob manifest (a dict) for this block, annotated with a hash of its spec."""
    from kubeflow.training import (KubeflowOrgV1PyTorchJob, KubeflowOrgV1PyTorchJobSpec, KubeflowOrgV1ReplicaSpec,
                                   KubeflowOrgV1RunPolicy)
    from kubernetes import client as k

    template = pod_template(pod_script(request, plan), opts, plan)
    # ExitCode: errors (exit 1-127) fail the job at once; signals (preemption, OOM kill) restart the pod.
    replicas = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="ExitCode", template=template)}
    if opts.nodes > 1:
        replicas["Worker"] = KubeflowOrgV1ReplicaSpec(replicas=opts.nodes - 1, restart_policy="ExitCode",
                                                      template=template)
    job = KubeflowOrgV1PyTorchJob(
        api_version=f"{GROUP}/{VERSION}", kind=KIND,
        metadata=k.V1ObjectMeta(name=plan.name, namespace=namespace, labels=_labels(plan)),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(opts.procs_per_node), pytorch_replica_specs=replicas,
            run_policy=KubeflowOrgV1RunPolicy(clean_pod_policy="Running", backoff_limit=opts.backoff_limit,
                                              ttl_seconds_after_finished=opts.ttl_s,
                                              active_deadline_seconds=opts.timeout_s)))
    body = k.ApiClient().sanitize_for_serialization(job)
    body["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: spec_hash(body["spec"])}
    return body


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ S3

def stage_inputs(storage: Storage, request: TrainRequest, plan: JobPlan, dataset_dir: Path) -> None:
    """Put on S3 what the pods read (see the module docstring)."""
    if not (dataset_dir / "data.yaml").is_file():
        raise TrainLaunchError(f"block {request.block}: dataset {dataset_dir} has no data.yaml")
    prefix = S3Uri.parse(plan.dataset_uri).prefix
    have = set(storage.list(plan.dataset_uri))  # objects appear only once complete: present means whole
    storage.upload_dir(dataset_dir, plan.dataset_uri, only_changed=False,
                       include=lambda p: prefix + p.relative_to(dataset_dir).as_posix() not in have)
    if request.class_weights:
        storage.upload_file(request.class_weights, f"{plan.inputs_uri}/class_weights.json")
    if request.maps:
        storage.upload_file(request.maps, f"{plan.inputs_uri}/maps.json")
    if request.resumes:  # not this block's own log, which is being written (and comes back with the folder)
        own_log = f"train_block{request.block}.log"
        storage.upload_dir(request.run_dir, plan.run_uri, only_changed=False, include=lambda p: p.name != own_log)


def fetch_outputs(storage: Storage, request: TrainRequest, plan: JobPlan) -> int:
    """Download the block's run folder into request.run_dir and check its checkpoint reached the
    block's last epoch (a job that 'succeeded' without training must not pass). Returns the file count."""
    from trainer.checkpoint import CheckpointError, load_checkpoint

    files = storage.download_dir(plan.run_uri, request.run_dir)
    last = request.run_dir / "weights" / "last.pt"
    if last not in files:
        raise TrainLaunchError(f"PyTorchJob {plan.name} succeeded but left no weights/last.pt in {plan.run_uri}")
    try:
        epoch = load_checkpoint(last)["epoch"]
    except CheckpointError as e:
        raise TrainLaunchError(f"PyTorchJob {plan.name}: {e}") from e
    if epoch != request.stop_epoch - 1:
        raise TrainLaunchError(f"PyTorchJob {plan.name} succeeded but its checkpoint {plan.run_uri}/weights/last.pt "
                               f"is at epoch {epoch}, not the block's last epoch {request.stop_epoch - 1}")
    return len(files)


def fetch_inputs(pairs: Sequence[tuple[str, str]], storage: Storage | None = None) -> None:
    """The pod's first step: download each S3 object to its local path."""
    storage = storage or Storage.from_env()
    for uri, path in pairs:
        storage.download_file(uri, path)


def upload_folder(local: Path, prefix: str, create_bucket: bool = False, storage: Storage | None = None) -> int:
    """Put a local folder (e.g. a dataset for k8s/pytorchjob.yaml) under an s3:// prefix; the file count."""
    if not local.is_dir():
        raise StorageError(f"{local} is not a folder")
    storage = storage or Storage.from_env()
    bucket = S3Uri.parse(prefix).bucket
    if create_bucket:  # Storage moves objects only; a bucket is made once, here, with the same settings
        import urllib3
        from minio import Minio
        from minio.error import MinioException

        cfg = storage.config
        client = Minio(cfg.endpoint, access_key=cfg.access_key, secret_key=cfg.secret_key, secure=cfg.secure,
                       region=cfg.region)
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
        except (MinioException, urllib3.exceptions.HTTPError) as e:
            raise StorageError(f"creating bucket '{bucket}' at {storage.endpoint} failed: {type(e).__name__}") from e
    return len(storage.upload_dir(local, prefix, only_changed=False))


def _printer(log: TextIO, echo: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        log.write(text + "\n")
        log.flush()
        if echo:
            print(text, flush=True)
    return say


def run_pytorchjob(request: TrainRequest, opts: JobOptions, dataset_dir: Path, cluster: Cluster | None = None,
                   storage: Storage | None = None, clock: Clock = Clock(), echo: bool = True) -> JobPlan:
    """Run the block as a PyTorchJob and leave its run folder in request.run_dir (see the module
    docstring). The log goes to run_dir/train_block{k}.log and, with `echo`, to the step's log."""
    if request.world_size != opts.world_size:
        raise ValueError(f"request world size {request.world_size} != {opts.nodes} node(s) x "
                         f"{opts.procs_per_node} process(es)")
    plan = plan_for(request, opts)
    storage = storage or Storage.from_env()
    request.run_dir.mkdir(parents=True, exist_ok=True)
    with (request.run_dir / f"train_block{request.block}.log").open("a") as log:
        say = _printer(log, echo)
        try:
            cluster = cluster or KubernetesCluster.connect(opts.namespace)
            job = build_job(request, opts, plan, cluster.namespace)
            _start(cluster, job, request, plan, dataset_dir, storage, say, clock, opts.poll_s)
            try:
                watch(cluster, plan.name, opts.timeout_s + START_GRACE_S, opts.poll_s, LogFollower(say), clock)
            finally:
                _finish(cluster, plan.name, opts.keep_job, say)
            say(f"[kfyolo] fetching {plan.run_uri} into the Model output")
            fetch_outputs(storage, request, plan)
        except (ClusterError, StorageError) as e:
            raise TrainLaunchError(f"training block {request.block} (PyTorchJob {plan.name}): {e}") from e
    return plan


def _start(cluster: Cluster, job: dict[str, Any], request: TrainRequest, plan: JobPlan, dataset_dir: Path,
           storage: Storage, say: Callable[[str], None], clock: Clock, poll_s: float) -> None:
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
    say(f"[kfyolo] created PyTorchJob {cluster.namespace}/{plan.name}: {json.dumps(_summary(job))}")


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    specs = job["spec"]["pytorchReplicaSpecs"]
    return {"replicas": {k: v["replicas"] for k, v in specs.items()}, "nprocPerNode": job["spec"]["nprocPerNode"],
            "image": specs["Master"]["template"]["spec"]["containers"][0]["image"]}


def _finish(cluster: Cluster, name: str, keep: bool, say: Callable[[str], None]) -> None:
    if keep:
        say(f"[kfyolo] keeping PyTorchJob {cluster.namespace}/{name} (kubectl -n {cluster.namespace} "
            f"describe pytorchjob {name}); its TTL removes it later")
        return
    try:
        cluster.delete(name)
        say(f"[kfyolo] deleted PyTorchJob {cluster.namespace}/{name}")
    except ClusterError as e:  # the outcome is known; a leftover job is a nuisance, not a failure
        say(f"[kfyolo] warning: could not delete PyTorchJob {name}: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    """The launcher's S3 staging by hand (credentials from the environment, as everywhere):

    python -m components.launchers.pytorchjob fetch URI PATH [URI PATH ...]      (the pod's first step)
    python -m components.launchers.pytorchjob upload FOLDER s3://bucket/prefix [--create-bucket]
    """
    p = argparse.ArgumentParser(prog="python -m components.launchers.pytorchjob", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download S3 objects to local paths (the pod's inputs)")
    f.add_argument("pairs", nargs="+", metavar="URI PATH")
    u = sub.add_parser("upload", help="upload a folder (e.g. a dataset) under an s3:// prefix")
    u.add_argument("folder", type=Path)
    u.add_argument("prefix", help="s3://bucket/prefix")
    u.add_argument("--create-bucket", action="store_true", help="create the bucket when it does not exist")
    args = p.parse_args(argv)
    if args.command == "fetch" and len(args.pairs) % 2:
        p.error("fetch takes URI PATH pairs")
    try:
        if args.command == "fetch":
            fetch_inputs(list(zip(args.pairs[::2], args.pairs[1::2])))
        else:
            n = upload_folder(args.folder, args.prefix, args.create_bucket)
            print(f"uploaded {n} files from {args.folder} to {args.prefix.rstrip('/')}/")
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
