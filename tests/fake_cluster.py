"""In-process stand-ins for the launcher's cluster boundary (components/launchers/cluster.py).

- `FakeCluster`: an API server in a dict. Each job follows a script of `Step`s, one per status()
  call (the last one repeats); create() applies the training operator's admission rules.
- `ProcessCluster`: a job's replicas as local processes. Each runs its container's command verbatim,
  with exactly the variables the training operator injects (on loopback) plus the container's own
  env, Secret references resolved from a dict and emptyDir mounts mapped to folders.
- `webhook_errors`, `crd_errors`: the PyTorchJob checks, shared with test_k8s_manifests.py.
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

from components.launchers.cluster import SPEC_HASH_ANNOTATION, ClusterError, Condition, JobExists, JobState, LogLine

CRD_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "k8s" / "kubeflow.org_pytorchjobs.yaml"
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


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
    return errors


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

    phase: str | None = None         # a condition of this type becomes true
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
        self._log: dict[str, list[LogLine]] = {}
        self._lines = 0

    def add(self, job: dict[str, Any], script: tuple[Step, ...], conditions: tuple[str, ...] = ("Created",)) -> None:
        """A job that is already there (made by an earlier attempt, or by someone else)."""
        name = job["metadata"]["name"]
        self.jobs[name] = copy.deepcopy(job)
        self._steps[name] = list(script)
        self._conditions[name] = [Condition(c, "True") for c in conditions]
        self._restarts[name], self._log[name] = 0, []

    def create(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        self.calls.append(("create", name))
        errors = webhook_errors(job)
        if errors:
            raise ClusterError(f"admission webhook denied the PyTorchJob: {'; '.join(errors)}")
        if name in self.jobs:
            raise JobExists(f"PyTorchJob {name} exists")
        self.add(job, self.script)
        if self.on_create is not None:
            self.on_create(job)

    def status(self, name: str) -> JobState | None:
        self.calls.append(("status", name))
        if name not in self.jobs:
            return None
        steps = self._steps[name]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        if step.api_error:
            raise ClusterError("get PyTorchJob: HTTP 503 Service Unavailable", transient=step.api_error == "transient")
        if step.deleted:
            del self.jobs[name]
            return None
        if step.phase:
            self._conditions[name].append(Condition(step.phase, "True", step.reason, step.message))
        self._restarts[name] += step.restarts
        for text in step.log:
            self._lines += 1
            self._log[name].append(LogLine(stamp(self._lines), text))
        return JobState.from_object({**self.jobs[name], "status": {"conditions": [
            {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
            for c in self._conditions[name]]}}, self._restarts[name])

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
    """Runs every replica of a created job as a local process and reports their exits as conditions."""

    def __init__(self, root: Path, secrets: dict[str, dict[str, str]], port: int, namespace: str = "local"):
        self.root, self.secrets, self.port, self.namespace = root, secrets, port, namespace
        self.jobs: dict[str, list[subprocess.Popen]] = {}
        self.envs: dict[str, list[dict[str, str]]] = {}
        self.hashes: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    def create(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        self.calls.append(("create", name))
        assert not webhook_errors(job), webhook_errors(job)
        specs = job["spec"]["pytorchReplicaSpecs"]
        pods = [spec["template"]["spec"] for rtype in ("Master", "Worker") if rtype in specs
                for spec in [specs[rtype]] * specs[rtype]["replicas"]]
        nproc = int(job["spec"]["nprocPerNode"])
        # What the image provides: PATH to its venv, HOME with matplotlib's font cache built; one
        # thread per process because CI has two cores.
        base = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ["HOME"],
                "OMP_NUM_THREADS": "1"}
        procs, envs = [], []
        for rank, pod in enumerate(pods):
            (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]
            folder = self.root / name / str(rank)
            mounts = {m["mountPath"]: folder / m["name"] for m in container["volumeMounts"]
                      if m["mountPath"] != "/dev/shm"}
            for local in mounts.values():
                local.mkdir(parents=True, exist_ok=True)
            env = {**base, **container_env(container, self.secrets, mounts),
                   **operator_env(rank, len(pods), nproc, self.port)}
            envs.append(env)
            log = (folder / "log.txt").open("w")
            procs.append(subprocess.Popen(container["command"], cwd=folder, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        self.jobs[name], self.envs[name] = procs, envs
        self.hashes[name] = job["metadata"]["annotations"][SPEC_HASH_ANNOTATION]

    def status(self, name: str) -> JobState | None:
        self.calls.append(("status", name))
        if name not in self.jobs:
            return None
        codes = [p.poll() for p in self.jobs[name]]
        conditions = [Condition("Created", "True"), Condition("Running", "True")]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
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
