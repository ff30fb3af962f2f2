"""The cluster boundary of the job launchers: four calls behind one small Protocol.

    create(job)          submit a job manifest; JobExists if the name is taken
    status(name)         its conditions and pod restarts, or None once it is gone
    logs(name, since)    the rank-0 node's training container's log lines stamped after `since`
    delete(name)         remove it and its pods (a missing job is not an error)

Two kinds of job speak it: the training operator's PyTorchJob (kubeflow.org/v1, legacy) and Kubeflow
Trainer v2's TrainJob (trainer.kubeflow.org/v1alpha1). A `JobKind` says what differs between them at
this boundary: the API resource, which pods are the job's and which is rank 0's, and how the status
reads (`JobState` / `TrainJobState`). Everything else in the launcher is plain logic, tested against
an in-process fake of this Protocol (tests/fake_cluster.py). `KubernetesCluster` is the only code here
that talks to an API server, so it stays thin: CustomObjectsApi with plain dicts for either kind (the
`kubeflow` SDK's TrainerClient builds its own trainer/runtime abstractions, reads runtimes, which
needs more RBAC, and has no room for our spec-hash adoption). It needs, in the job's namespace, what
k8s/rbac.yaml grants: create, get, list, watch and delete on the job kind; get, list and watch on
pods; get on pods/log.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"                      # the operator injects its variables into this container only
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
JOB_ROLE_LABEL = "training.kubeflow.org/job-role"
# A TrainJob runs as a JobSet of the same name; the torch runtime's one replicated job is `node`, an
# Indexed Job whose completion index is the node rank, its training container also named `node`.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
SPEC_HASH_ANNOTATION = "kfyolo/spec-hash"  # tells our job from a stranger's of the same name
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
KFP_SECRET = "mlpipeline-minio-artifact"   # KFP's own object-store Secret: keys accesskey / secretkey
TRANSIENT_STATUS = frozenset({0, 429, 500, 502, 503, 504})
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$")

T = TypeVar("T")


class ClusterError(RuntimeError):
    """An API call failed; `transient` says whether asking again later may succeed."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class JobExists(ClusterError):
    """create() found a job of that name already there."""


@dataclass(frozen=True)
class Condition:
    type: str                  # Created, Running, Restarting, Succeeded, Failed, Suspended
    status: str                # "True" / "False" / "Unknown"
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class JobState:
    """What the launcher needs of a PyTorchJob's status."""

    conditions: tuple[Condition, ...] = ()
    spec_hash: str = ""        # our annotation, "" when absent
    restarts: int = 0          # container restarts summed over the job's pods
    SUCCEEDED: ClassVar[str] = "Succeeded"   # the phase of a job that finished well

    @property
    def phase(self) -> str:
        """The type of the newest true condition (the operator appends them in order), else Pending."""
        true = [c for c in self.conditions if c.status == "True"]
        return true[-1].type if true else "Pending"

    @property
    def succeeded(self) -> bool:
        return self.phase == self.SUCCEEDED

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"

    def reason(self) -> str:
        """'Reason: message' of the condition that set the phase, '' when there is none."""
        for c in reversed(self.conditions):
            if c.status == "True" and c.type == self.phase:
                return ": ".join(part for part in (c.reason, c.message) if part)
        return ""

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], restarts: int = 0) -> "JobState":
        """From a PyTorchJob as the API returns it (a dict)."""
        raw = (obj.get("status") or {}).get("conditions") or []
        conditions = tuple(Condition(str(c.get("type", "")), str(c.get("status", "")), str(c.get("reason") or ""),
                                     str(c.get("message") or "")) for c in raw)
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        return cls(conditions, str(annotations.get(SPEC_HASH_ANNOTATION, "")), restarts)


@dataclass(frozen=True)
class TrainJobState(JobState):
    """A TrainJob's status: conditions keyed by type (Complete, Failed, Suspended; no order to read)
    plus jobsStatus, whose active child Jobs say it runs."""

    active: int = 0            # child Jobs with a pod running or pending
    SUCCEEDED: ClassVar[str] = "Complete"

    @property
    def phase(self) -> str:
        true = {c.type for c in self.conditions if c.status == "True"}
        for kind in ("Failed", "Complete", "Suspended"):
            if kind in true:
                return kind
        return "Running" if self.active else ("Created" if "Created" in true else "Pending")

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], restarts: int = 0) -> "TrainJobState":
        """From a TrainJob as the API returns it (a dict)."""
        jobs = (obj.get("status") or {}).get("jobsStatus") or []
        return replace(super().from_object(obj, restarts), active=sum(int(j.get("active") or 0) for j in jobs))


@dataclass(frozen=True)
class JobKind:
    """One kind of training job as the API serves it: its resource, its pods, how its status reads."""

    kind: str
    group: str
    version: str
    plural: str
    container: str                          # the training container (the controller injects PET_* there)
    name_label: str                         # on every pod of the job, valued with the job's name
    master_labels: tuple[tuple[str, str], ...]  # ... and these on the rank-0 node's pod
    state: type[JobState]
    controller: str                         # what serves the kind, for the hint when it is missing

    def pods(self, name: str) -> str:
        """The label selector of the job's pods."""
        return f"{self.name_label}={name}"

    def master(self, name: str) -> str:
        """The label selector of the rank-0 node's pod."""
        return ",".join([self.pods(name), *(f"{k}={v}" for k, v in self.master_labels)])


PYTORCHJOB = JobKind(KIND, GROUP, VERSION, PLURAL, CONTAINER, JOB_NAME_LABEL, ((JOB_ROLE_LABEL, "master"),), JobState,
                     "the Kubeflow training operator (the PyTorchJob CRD)")
TRAINJOB = JobKind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "node", JOBSET_NAME_LABEL,
                   ((REPLICATED_JOB_LABEL, "node"), (COMPLETION_INDEX_LABEL, "0")), TrainJobState,
                   "Kubeflow Trainer v2 (the TrainJob CRD)")


@dataclass(frozen=True, order=True)
class LogLine:
    stamp: str                 # RFC 3339 UTC with 9 fraction digits, so stamps sort as strings
    text: str


class Cluster(Protocol):
    """The four calls the launcher makes; `namespace` is where the jobs live."""

    namespace: str

    def create(self, job: dict[str, Any]) -> None: ...

    def status(self, name: str) -> JobState | None: ...

    def logs(self, name: str, since: str = "") -> list[LogLine]: ...

    def delete(self, name: str) -> None: ...


@dataclass(frozen=True)
class S3Secret:
    """Where steps and job pods get the S3 environment: a Secret, read key by key into variables.

    Our own Secret (k8s/s3-secret.yaml) holds S3_ENDPOINT, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    KFP's `mlpipeline-minio-artifact` holds only `accesskey` / `secretkey`; its endpoint, not a
    credential, is then given as `endpoint` and set as a plain variable."""

    name: str = "kfyolo-s3"
    endpoint: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", self.name) or len(self.name) > 253:
            raise ValueError(f"S3 secret name {self.name!r} is not a valid Kubernetes object name")
        if self.name == KFP_SECRET and not self.endpoint:
            raise ValueError(f"secret {KFP_SECRET} holds no endpoint: give the S3 endpoint too "
                             "(e.g. http://minio-service.kubeflow:9000)")
        if "@" in self.endpoint:
            raise ValueError("the S3 endpoint must not carry credentials; they come from the Secret")

    @property
    def keys(self) -> dict[str, str]:
        """Secret key -> environment variable."""
        if self.name == KFP_SECRET:
            return {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
        names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if self.endpoint else \
            ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        return {n: n for n in names}


def normalize_stamp(stamp: str) -> str:
    """'2024-01-05T22:58:20.12Z' -> '2024-01-05T22:58:20.120000000Z' (the API trims trailing zeros)."""
    m = _STAMP.match(stamp)
    if not m:
        raise ValueError(f"not an RFC 3339 UTC timestamp: {stamp!r}")
    return f"{m.group(1)}.{(m.group(2) or '').ljust(9, '0')}Z"


def parse_log(text: str) -> list[LogLine]:
    """Lines of a `timestamps=true` pod log; a line without a stamp continues the previous one's."""
    out: list[LogLine] = []
    for raw in text.splitlines():
        stamp, _, rest = raw.partition(" ")
        try:
            out.append(LogLine(normalize_stamp(stamp), rest))
        except ValueError:
            out.append(LogLine(out[-1].stamp if out else "", raw))
    return out


def current_namespace() -> str:
    """The namespace of the pod this runs in (the pipeline's), from its service-account mount."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError as e:
        raise ClusterError(f"no namespace given and none at {SERVICE_ACCOUNT_NAMESPACE} ({e}); "
                           "pass the namespace explicitly when running outside a pod") from e


class KubernetesCluster:
    """The Protocol over the `kubernetes` client: CustomObjectsApi for jobs of one kind, CoreV1Api for pods."""

    def __init__(self, namespace: str, custom_api: Any, core_api: Any,
                 now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
                 kind: JobKind = PYTORCHJOB):
        self.namespace, self._custom, self._core, self._now, self.kind = namespace, custom_api, core_api, now, kind

    @classmethod
    def connect(cls, namespace: str = "", kind: JobKind = PYTORCHJOB) -> "KubernetesCluster":
        """In a pod: its service account; elsewhere: the kubeconfig's current context."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as e:
                raise ClusterError(f"no in-cluster service account and no usable kubeconfig ({e})") from e
        return cls(namespace or current_namespace(), client.CustomObjectsApi(), client.CoreV1Api(), kind=kind)

    def _resource(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def create(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        self._call(f"create {self.kind.kind} {name}", lambda: self._custom.create_namespaced_custom_object(
            *self._resource(), job), exists=True)

    def status(self, name: str) -> JobState | None:
        obj = self._call(f"get {self.kind.kind} {name}", lambda: self._custom.get_namespaced_custom_object(
            *self._resource(), name), missing_ok=True)
        if obj is None:
            return None
        pods = self._pods(self.kind.pods(name))
        restarts = sum(cs.restart_count or 0 for p in pods for cs in (p.status.container_statuses or []))
        return self.kind.state.from_object(obj, restarts)

    def logs(self, name: str, since: str = "") -> list[LogLine]:
        pods = [p for p in self._pods(self.kind.master(name)) if p.status.phase not in (None, "Pending")]
        if not pods:
            return []
        # A TrainJob's node 0 may have a failed pod beside its replacement: follow the running, newest one.
        pods.sort(key=lambda p: (p.status.phase == "Running", _created(p)), reverse=True)
        window = None
        if since:  # ask only for the recent past (plus a minute for clock skew), then drop what we had
            age = self._now() - datetime.datetime.fromisoformat(since[:19] + "+00:00")
            window = max(1, int(age.total_seconds()) + 60)
        text = self._call(f"read the log of {pods[0].metadata.name}", lambda: self._core.read_namespaced_pod_log(
            pods[0].metadata.name, self.namespace, container=self.kind.container, timestamps=True,
            since_seconds=window),
            missing_ok=True, unready_ok=True)
        return [line for line in parse_log(text or "") if line.stamp > since]

    def delete(self, name: str) -> None:
        # Foreground: the job disappears only after its pods, so a new job of the same name starts clean.
        self._call(f"delete {self.kind.kind} {name}", lambda: self._custom.delete_namespaced_custom_object(
            *self._resource(), name, body={"propagationPolicy": "Foreground"}), missing_ok=True)

    def _pods(self, selector: str) -> list[Any]:
        return self._call(f"list pods ({selector})", lambda: self._core.list_namespaced_pod(
            self.namespace, label_selector=selector)).items

    def _call(self, what: str, fn: Callable[[], T], missing_ok: bool = False, exists: bool = False,
              unready_ok: bool = False) -> T | None:
        """Run one API call; map failures to ClusterError with a hint at the usual cause."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            return fn()
        except ApiException as e:
            if e.status == 404 and missing_ok:
                return None
            if e.status == 400 and unready_ok:  # the container is still being created
                return None
            if e.status == 409 and exists:
                raise JobExists(f"{what}: a {self.kind.kind} of that name exists in {self.namespace}") from e
            hint = {403: f"; apply k8s/rbac.yaml for this service account in {self.namespace}",
                    404: f"; is {self.kind.controller} installed?"}.get(e.status, "")
            raise ClusterError(f"{what} in namespace {self.namespace}: HTTP {e.status} {e.reason}"
                               f"{_api_message(e.body)}{hint}", transient=e.status in TRANSIENT_STATUS) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ClusterError(f"{what}: the API server is unreachable ({type(e).__name__}: {e})",
                               transient=True) from e


def _created(pod: Any) -> float:
    stamp = getattr(pod.metadata, "creation_timestamp", None)
    return stamp.timestamp() if stamp else 0.0


def _api_message(body: Any) -> str:
    """': <message>' of an API error's Status body (what a schema check or admission webhook said), else ''."""
    try:
        message = json.loads(body).get("message", "") if body else ""
    except (TypeError, ValueError, AttributeError):
        return ""
    return f": {message}" if isinstance(message, str) and message else ""
