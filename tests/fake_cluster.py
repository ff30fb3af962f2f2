"""In-process stand-ins for the launchers' cluster boundary (components/launchers/cluster.py), for
both kinds of job: PyTorchJob (training operator v1) and TrainJob (Kubeflow Trainer v2).

- `FakeCluster`: an API server in a dict. Each job follows a script of `Step`s, one per status()
  call (the last one repeats); create() applies the kind's admission rules, and status() writes the
  kind's own status object (appended conditions; or conditions keyed by type plus jobsStatus), read
  back through the launcher's own reader for that kind.
- `ProcessCluster`: a job's nodes as local processes. Each runs its container's command verbatim,
  with exactly the variables the job's controller injects (on loopback) plus the container's own
  env, Secret references resolved from a dict and emptyDir mounts mapped to folders.
- `webhook_errors`, `crd_errors`: the PyTorchJob checks, shared with test_k8s_manifests.py;
  `trainer_webhook_errors`: Trainer v2's admission rules for a TrainJob on the torch runtime.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from components.launchers.cluster import (PYTORCHJOB, SPEC_HASH_ANNOTATION, TRAINJOB, ClusterError, Condition,
                                          JobExists, JobKind, JobState, LogLine)

CRD_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "k8s" / "kubeflow.org_pytorchjobs.yaml"
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# What a ClusterTrainingRuntime offers a TrainJob to patch: replicated job -> its containers (the
# torch-distributed runtime of /work/shared/k8s/trainer-v2.3.0; test_trainjob_manifests.py checks it).
RUNTIMES = {"torch-distributed": {"node": ("node",)}}
# Trainer v2 sets these in the `node` container; a TrainJob may not (its torch plugin's webhook).
TORCH_RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                                "PET_MASTER_PORT"})


def stamp(n: int) -> str:
    """The n-th log stamp: increasing RFC 3339 times one second apart."""
    return f"2025-01-01T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}.000000000Z"


# ------------------------------------------------------------------------------------ checks

def webhook_errors(job: dict[str, Any]) -> list[str]:
    """What the training operator's admission webhook would reject (kubeflow.org/v1 PyTorchJob)."""
    errors = []
    name = (job.get("metadata") or {}).get("name", "")
    if not DNS1035.fullmatch(name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    specs = (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}
    if not specs:
        errors.append("spec.pytorchReplicaSpecs is empty")
    for rtype, spec in specs.items():
        if rtype not in ("Master", "Worker"):
            errors.append(f"replica type {rtype!r} is not Master or Worker")
        containers = (((spec or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            errors.append(f"{rtype}: no container named pytorch")
        errors += [f"{rtype}: container {c.get('name')!r} has no image" for c in containers if not c.get("image")]
    if "Master" not in specs:
        errors.append("no Master replica")
    elif specs["Master"].get("replicas", 1) != 1:
        errors.append("Master replicas must be exactly 1")
    elastic = (job.get("spec") or {}).get("elasticPolicy")
    if elastic:  # the operator puts the rendezvous on <job>-worker-0 at the Worker's pytorchjob-port
        low, high = elastic.get("minReplicas"), elastic.get("maxReplicas")
        if low is None or high is None or low > high:
            errors.append(f"elasticPolicy: minReplicas {low} > maxReplicas {high}")
        if elastic.get("rdzvBackend", "c10d") not in ("c10d", "etcd", "etcd-v2"):
            errors.append(f"elasticPolicy: unknown rdzvBackend {elastic['rdzvBackend']!r}")
        worker = (((specs.get("Worker") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        ports = [p for c in worker if c.get("name") == "pytorch" for p in c.get("ports") or []]
        if not worker:
            errors.append("elasticPolicy: no Worker to run the rendezvous on")
        elif not any(p.get("name") == "pytorchjob-port" for p in ports):
            errors.append("elasticPolicy: the Worker's pytorch container declares no pytorchjob-port")
    return errors


def trainer_webhook_errors(job: dict[str, Any], runtimes: dict[str, dict[str, tuple[str, ...]]] = RUNTIMES
                           ) -> list[str]:
    """What Kubeflow Trainer v2's admission webhook would reject of a TrainJob on a torch runtime
    (the CRD's schema and CEL rules are tests/crd_check.py's)."""
    spec = job.get("spec") or {}
    runtime = (spec.get("runtimeRef") or {}).get("name", "")
    if runtime not in runtimes:
        return [f"spec.runtimeRef.name: ClusterTrainingRuntime {runtime!r} not found"]
    trainer = spec.get("trainer") or {}
    errors = []
    reserved = sorted({e.get("name") for e in trainer.get("env") or []} & TORCH_RESERVED_ENV)
    if reserved:
        errors.append(f"spec.trainer.env: must not have reserved envs, invalid envs configured: {reserved}")
    for key in ("numNodes", "numProcPerNode"):
        if not isinstance(trainer.get(key, 1), int) or trainer.get(key, 1) < 1:
            errors.append(f"spec.trainer.{key}: must be a positive integer")
    for patch in spec.get("runtimePatches") or []:
        jobs = (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}) \
            .get("replicatedJobs") or []
        for rjob in jobs:
            containers = runtimes[runtime].get(rjob.get("name"))
            if containers is None:
                errors.append(f"runtimePatches: replicated job {rjob.get('name')!r} is not in runtime {runtime}")
                continue
            pod = (((rjob.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
            for c in pod.get("containers") or []:
                if c.get("name") not in containers:
                    errors.append(f"runtimePatches: container {c.get('name')!r} is not in {rjob['name']}")
                elif c.get("name") == "node" and c.get("env"):
                    errors.append("runtimePatches: env of container node can only be set through spec.trainer.env")
    return errors


def admission_errors(job: dict[str, Any]) -> list[str]:
    """The admission rules of the job's kind."""
    return trainer_webhook_errors(job) if job.get("kind") == TRAINJOB.kind else webhook_errors(job)


def kind_of(job: dict[str, Any]) -> JobKind:
    return TRAINJOB if job.get("kind") == TRAINJOB.kind else PYTORCHJOB


def strict_schema(node: Any) -> Any:
    """The CRD schema with unknown fields rejected: the API server would prune them silently, so a
    misspelt field would simply vanish from the job."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(path: Path = CRD_PATH):
    """A jsonschema validator for the CRD's v1 openAPIV3Schema, made strict."""
    import jsonschema

    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def crd_errors(job: dict[str, Any], validator: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(job)]


# ------------------------------------------------------------------------------------ FakeCluster

@dataclass(frozen=True)
class Step:
    """What a job does between two status() calls."""

    phase: str | None = None         # a condition of this type becomes true; for a TrainJob "Running"
                                     # means its child Job is active (TrainJobs have no such condition)
    reason: str = ""
    message: str = ""
    restarts: int = 0                # pod restarts added
    log: tuple[str, ...] = ()        # lines the master prints
    deleted: bool = False            # someone deletes the job
    api_error: str = ""              # this status() fails: "transient" or "fatal"


class FakeCluster:
    """The Cluster Protocol in memory; `calls` records (verb, name) in order."""

    def __init__(self, namespace: str = "team-a", script: tuple[Step, ...] = (Step("Running"), Step("Succeeded")),
                 on_create: Callable[[dict[str, Any]], None] | None = None):
        self.namespace, self.script, self.on_create = namespace, script, on_create
        self.jobs: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self._steps: dict[str, list[Step]] = {}
        self._conditions: dict[str, list[Condition]] = {}
        self._restarts: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._log: dict[str, list[LogLine]] = {}
        self._lines = 0

    def add(self, job: dict[str, Any], script: tuple[Step, ...], conditions: tuple[str, ...] = ("Created",)) -> None:
        """A job that is already there (made by an earlier attempt, or by someone else)."""
        name = job["metadata"]["name"]
        self.jobs[name] = copy.deepcopy(job)
        self._steps[name] = list(script)
        trainjob = job.get("kind") == TRAINJOB.kind  # its "Running" is an active child Job, not a condition
        self._conditions[name] = [Condition(c, "True") for c in conditions if not (trainjob and c == "Running")]
        self._restarts[name], self._log[name] = 0, []
        self._active[name] = int(trainjob and "Running" in conditions)

    def create(self, job: dict[str, Any]) -> None:
        name, kind = job["metadata"]["name"], job.get("kind", "")
        self.calls.append(("create", name))
        errors = admission_errors(job)
        if errors:
            raise ClusterError(f"admission webhook denied the {kind}: {'; '.join(errors)}")
        if name in self.jobs:
            raise JobExists(f"{kind} {name} exists")
        self.add(job, self.script)
        if self.on_create is not None:
            self.on_create(job)

    def status(self, name: str) -> JobState | None:
        self.calls.append(("status", name))
        if name not in self.jobs:
            return None
        steps = self._steps[name]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        job = self.jobs[name]
        if step.api_error:
            raise ClusterError(f"get {job['kind']}: HTTP 503 Service Unavailable",
                               transient=step.api_error == "transient")
        if step.deleted:
            del self.jobs[name]
            return None
        trainjob = job.get("kind") == TRAINJOB.kind
        if trainjob and step.phase == "Running":
            self._active[name] = 1
        elif step.phase:
            if trainjob:  # a list keyed by type: a condition replaces the one of its type
                self._conditions[name] = [c for c in self._conditions[name] if c.type != step.phase]
                self._active[name] = 0 if step.phase in ("Complete", "Failed", "Suspended") else self._active[name]
            self._conditions[name].append(Condition(step.phase, "True", step.reason, step.message))
        self._restarts[name] += step.restarts
        for text in step.log:
            self._lines += 1
            self._log[name].append(LogLine(stamp(self._lines), text))
        status: dict[str, Any] = {"conditions": [
            {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
            for c in self._conditions[name]]}
        if trainjob:
            status["jobsStatus"] = [{"name": "node", "active": self._active[name], "ready": self._active[name],
                                     "succeeded": 0, "failed": 0, "suspended": 0}]
        return kind_of(job).state.from_object({**job, "status": status}, self._restarts[name])

    def logs(self, name: str, since: str = "") -> list[LogLine]:
        self.calls.append(("logs", name))
        return [line for line in self._log.get(name, []) if line.stamp > since]

    def delete(self, name: str) -> None:
        self.calls.append(("delete", name))
        self.jobs.pop(name, None)


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.t, self.sleeps = 0.0, 0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        self.sleeps += 1


# ------------------------------------------------------------------------------------ ProcessCluster

def trainer_env(node_rank: int, nodes: int, nproc: int, port: int) -> dict[str, str]:
    """What Kubeflow Trainer v2 sets in the `node` container of node `node_rank` (PET_* only; the
    master's address <job>-node-0-0.<job> is here loopback)."""
    return {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(node_rank),
            "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}


def operator_env(node_rank: int, nodes: int, nproc: int, port: int) -> dict[str, str]:
    """What the training operator sets in replica `node_rank` (Master 0, Workers 1..) of a job with
    nprocPerNode = nproc; the master's address is its Service, here loopback."""
    return {"MASTER_ADDR": "localhost", "MASTER_PORT": str(port), "WORLD_SIZE": str(nodes * nproc),
            "RANK": str(node_rank), "PYTHONUNBUFFERED": "1", "PET_NNODES": str(nodes),
            "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(node_rank), "PET_MASTER_ADDR": "localhost",
            "PET_MASTER_PORT": str(port)}


def container_env(container: dict[str, Any], secrets: dict[str, dict[str, str]],
                  mounts: dict[str, Path]) -> dict[str, str]:
    """The container's own env: literal values (paths under a mounted emptyDir mapped to its folder)
    and Secret references resolved as the kubelet would (a missing key fails the pod)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            value = item["value"]
            for mount_path, local in mounts.items():
                if value == mount_path or value.startswith(mount_path + "/"):
                    value = str(local) + value[len(mount_path):]
            env[item["name"]] = value
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


class ProcessCluster:
    """Runs every node of a created job as a local process and reports their exits as conditions."""

    def __init__(self, root: Path, secrets: dict[str, dict[str, str]], port: int, namespace: str = "local"):
        self.root, self.secrets, self.port, self.namespace = root, secrets, port, namespace
        self.jobs: dict[str, list[subprocess.Popen]] = {}
        self.envs: dict[str, list[dict[str, str]]] = {}
        self.hashes: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    def _nodes(self, job: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """(training container, what its controller injects) for every node, rank 0 first."""
        if job["kind"] == TRAINJOB.kind:
            trainer, (patch,) = job["spec"]["trainer"], job["spec"]["runtimePatches"]
            (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
            (mounts,) = [c for c in rjob["template"]["spec"]["template"]["spec"]["containers"] if c["name"] == "node"]
            container = {"name": "node", "command": trainer["command"], "env": trainer.get("env", []),
                         "volumeMounts": mounts.get("volumeMounts", [])}
            nodes, nproc = trainer["numNodes"], trainer["numProcPerNode"]
            return [(container, trainer_env(rank, nodes, nproc, self.port)) for rank in range(nodes)]
        specs = job["spec"]["pytorchReplicaSpecs"]
        pods = [spec["template"]["spec"] for rtype in ("Master", "Worker") if rtype in specs
                for spec in [specs[rtype]] * specs[rtype]["replicas"]]
        nproc = int(job["spec"]["nprocPerNode"])
        containers = [c for pod in pods for c in pod["containers"] if c["name"] == "pytorch"]
        assert len(containers) == len(pods)
        return [(c, operator_env(rank, len(pods), nproc, self.port)) for rank, c in enumerate(containers)]

    def create(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        self.calls.append(("create", name))
        assert not admission_errors(job), admission_errors(job)
        # What the image provides: PATH to its venv, HOME with matplotlib's font cache built; one
        # thread per process because CI has two cores.
        base = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ["HOME"],
                "OMP_NUM_THREADS": "1"}
        procs, envs = [], []
        for rank, (container, injected) in enumerate(self._nodes(job)):
            folder = self.root / name / str(rank)
            mounts = {m["mountPath"]: folder / m["name"] for m in container["volumeMounts"]
                      if m["mountPath"] != "/dev/shm"}
            for local in mounts.values():
                local.mkdir(parents=True, exist_ok=True)
            env = {**base, **container_env(container, self.secrets, mounts), **injected}
            envs.append(env)
            log = (folder / "log.txt").open("w")
            procs.append(subprocess.Popen(container["command"], cwd=folder, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        self.jobs[name], self.envs[name] = procs, envs
        self.hashes[name], self.kinds[name] = job["metadata"]["annotations"][SPEC_HASH_ANNOTATION], job["kind"]

    def status(self, name: str) -> JobState | None:
        self.calls.append(("status", name))
        if name not in self.jobs:
            return None
        codes = [p.poll() for p in self.jobs[name]]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if self.kinds[name] == TRAINJOB.kind:  # conditions keyed by type, and the child Job's activity
            conditions = [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                           "message": f"node {failed[0][0]} exited with status {failed[0][1]}"}] if failed else \
                [{"type": "Complete", "status": "True", "reason": "AllJobsCompleted"}] if all(c == 0 for c in codes) \
                else []
            active = int(not conditions)
            return TRAINJOB.state.from_object({
                "metadata": {"annotations": {SPEC_HASH_ANNOTATION: self.hashes[name]}},
                "status": {"conditions": conditions, "jobsStatus": [{"name": "node", "active": active}]}})
        conditions = [Condition("Created", "True"), Condition("Running", "True")]
        if failed:
            conditions.append(Condition("Failed", "True", "PyTorchJobFailed",
                                        f"replica {failed[0][0]} exited with status {failed[0][1]}"))
        elif all(c == 0 for c in codes):
            conditions.append(Condition("Succeeded", "True", "PyTorchJobSucceeded"))
        return JobState(tuple(conditions), self.hashes[name])

    def logs(self, name: str, since: str = "") -> list[LogLine]:
        path = self.root / name / "0" / "log.txt"
        lines = path.read_text(errors="replace").split("\n")[:-1] if path.is_file() else []  # whole lines only
        return [LogLine(stamp(i), text) for i, text in enumerate(lines, start=1) if stamp(i) > since]

    def master_log(self, name: str) -> str:
        return (self.root / name / "0" / "log.txt").read_text(errors="replace")

    def delete(self, name: str) -> None:
        self.calls.append(("delete", name))
        for proc in self.jobs.pop(name, []):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
