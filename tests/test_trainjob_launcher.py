"""The TrainJob launcher (Kubeflow Trainer v2) against the in-process fake cluster (tests/fake_cluster.py)
and moto S3: success, failure with the job's reason, adoption, timeout, deletion during the wait, API
hiccups; the TrainJob it builds; how a TrainJob's status reads; KubernetesCluster for TrainJobs over
stub API objects. The shared path is PyTorchJob's (test_pytorchjob_launcher.py covers it in depth);
these tests hold it to the same guarantees for the second kind."""

from __future__ import annotations

import json
import re

import pytest
from fake_cluster import FakeClock, FakeCluster, Step, trainer_webhook_errors
from launcher_cases import block_request, dataset, job_options, pods_write, storage  # noqa: F401
from kfp.dsl import Artifact, Dataset, Model

from components import train_block
from components.launchers import TrainLaunchError
from components.launchers.cluster import SPEC_HASH_ANNOTATION, TRAINJOB, KubernetesCluster, S3Secret, TrainJobState
from components.launchers.clusterjob import JobOptions, plan_for
from components.launchers.trainjob import build_job, run_trainjob

RUN = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
pytestmark = pytest.mark.timeout(120)  # a watch loop that never ends must fail, not hang CI
OK = (Step("Running", log=("rank 0/2 joined gloo process group",)), Step(log=("epoch 0 done", "epoch 1 done")),
      Step("Complete", reason="JobSetCompleted", log=("bye",)))


def _opts(**kw) -> JobOptions:
    return job_options(RUN, **kw)


_request, _storage, _pods_write = block_request, storage, pods_write


def _run(request, opts, dataset, cluster, clock=None):
    return run_trainjob(request, opts, dataset, cluster=cluster, storage=_storage(), clock=clock or FakeClock())


# ------------------------------------------------------------------------------------ outcomes

def test_success_stages_creates_a_trainjob_streams_deletes_and_fetches(s3, tmp_path, dataset, capsys):
    request, opts = _request(tmp_path), _opts()
    created = []
    cluster = FakeCluster(script=OK, on_create=lambda job: (created.append(job), _pods_write(request, opts)(job)))
    plan = _run(request, opts, dataset, cluster)
    (job,) = created
    assert job["kind"] == "TrainJob" and job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["metadata"]["name"] == plan.name == f"kfyolo-{RUN}-b0"
    verbs = [v for v, _ in cluster.calls]
    assert verbs[:2] == ["status", "create"] and verbs[-1] == "delete" and plan.name not in cluster.jobs
    assert _storage().exists(f"{plan.dataset_uri}/data.yaml")
    assert _storage().exists(f"{plan.inputs_uri}/class_weights.json")
    assert (request.run_dir / "results.csv").read_text() == "epoch\n0\n1\n"
    out = capsys.readouterr().out
    for line in ("rank 0/2 joined gloo process group", "epoch 1 done", "bye", f"TrainJob team-a/{plan.name}: Running",
                 f"TrainJob team-a/{plan.name}: Complete (JobSetCompleted)", f"deleted TrainJob team-a/{plan.name}"):
        assert out.count(line) == 1, line
    assert out.index("epoch 0 done") < out.index(": Complete")
    assert '"runtime": "torch-distributed", "numNodes": 2, "numProcPerNode": 1' in out


@pytest.mark.parametrize("reason, message", [
    ("FailedJobs", "jobset failed: job kfyolo-x-node-0 failed (1 node pod exited with status 1)"),
    ("DeadlineExceeded", "TrainJob exceeded its activeDeadlineSeconds"),
])
def test_a_failed_trainjob_fails_the_step_with_its_reason(s3, tmp_path, dataset, reason, message):
    request, opts = _request(tmp_path), _opts()
    cluster = FakeCluster(script=(Step("Running", log=("error: --hyp-override lr0=-1: hyp 'lr0' must be > 0",)),
                                  Step("Failed", reason=reason, message=message)))
    with pytest.raises(TrainLaunchError, match=re.escape(f"TrainJob team-a/kfyolo-{RUN}-b0 failed: {reason}: "
                                                         f"{message}")) as e:
        _run(request, opts, dataset, cluster)
    assert "trainer: error: --hyp-override lr0=-1" in str(e.value)
    assert cluster.calls[-1][0] == "delete" and not (request.run_dir / "weights").exists()


def test_a_trainjob_that_outlasts_the_timeout_is_deleted_and_fails_the_step(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts(timeout_s=60, poll_s=30.0)
    cluster, clock = FakeCluster(script=(Step("Running", log=("still training",)), Step())), FakeClock()
    with pytest.raises(TrainLaunchError, match=r"TrainJob .* timed out: still Running after 660 s[\s\S]*still "
                                               r"training"):
        _run(request, opts, dataset, cluster, clock)
    assert 660 <= clock.t < 660 + 30 and cluster.calls[-1][0] == "delete" and not cluster.jobs


def test_a_suspended_trainjob_waits_and_times_out_as_suspended(s3, tmp_path, dataset, capsys):
    request, opts = _request(tmp_path), _opts(timeout_s=60, poll_s=30.0)
    cluster = FakeCluster(script=(Step("Suspended", reason="Suspended", message="TrainJob is suspended"), Step()))
    with pytest.raises(TrainLaunchError, match="timed out: still Suspended"):
        _run(request, opts, dataset, cluster)
    assert ": Suspended (Suspended: TrainJob is suspended)" in capsys.readouterr().out


def test_a_trainjob_deleted_during_the_wait_fails_the_step(s3, tmp_path, dataset):
    cluster = FakeCluster(script=(Step("Running", log=("epoch 0",)), Step(deleted=True)))
    with pytest.raises(TrainLaunchError, match=r"TrainJob team-a/\S+ was deleted while the step waited for it "
                                               r"\(last state Running\)[\s\S]*epoch 0"):
        _run(_request(tmp_path), _opts(), dataset, cluster)


def test_api_hiccups_are_retried_but_a_lasting_failure_is_not(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts()
    flaky = FakeCluster(script=(Step(api_error="transient"), Step("Running"), Step(api_error="transient"),
                                Step("Complete")), on_create=_pods_write(request, opts))
    _run(request, opts, dataset, flaky)
    broken = FakeCluster(script=(Step("Running"), Step(api_error="fatal")))
    with pytest.raises(TrainLaunchError, match="lost track of TrainJob team-a/"):
        _run(_request(tmp_path / "b"), opts, dataset, broken)


# ------------------------------------------------------------------------------------ adoption

def test_a_retried_step_adopts_its_running_trainjob_without_staging_again(s3, tmp_path, dataset, capsys):
    request, opts = _request(tmp_path), _opts()
    plan, cluster = plan_for(request, _opts()), FakeCluster()
    cluster.add(build_job(request, opts, plan, cluster.namespace), (Step(log=("epoch 1",)), Step("Complete")),
                ("Running",))
    _pods_write(request, opts)(None)
    _run(request, opts, dataset, cluster)
    assert "create" not in [v for v, _ in cluster.calls] and not _storage().exists(f"{plan.dataset_uri}/data.yaml")
    assert f"adopting TrainJob {plan.name} (Running)" in capsys.readouterr().out
    assert (request.run_dir / "weights" / "last.pt").is_file()


def test_an_earlier_attempts_failed_trainjob_is_replaced_and_a_strangers_left_alone(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts()
    cluster = FakeCluster(script=(Step("Complete"),), on_create=_pods_write(request, opts))
    cluster.add(build_job(request, opts, plan_for(request, opts), cluster.namespace), (Step(),), ("Failed",))
    _run(request, opts, dataset, cluster)
    verbs = [v for v, _ in cluster.calls]
    assert verbs.index("delete") < verbs.index("create")

    other = FakeCluster()
    other.add(build_job(request, _opts(runtime="torch-distributed-gpu"), plan_for(request, opts), other.namespace),
              (Step("Running"),))
    with pytest.raises(TrainLaunchError, match=r"TrainJob team-a/\S+ exists but was not made from this block's spec"):
        _run(_request(tmp_path / "b"), opts, dataset, other)
    assert [v for v, _ in other.calls] == ["status"]


# ------------------------------------------------------------------------------------ the TrainJob

def test_the_trainjob_carries_the_block_on_the_runtime_with_patches_for_the_pod(tmp_path):
    request = _request(tmp_path, block=1, world_size=6)
    opts = _opts(nodes=3, gpus_per_node=2, cpu="8", memory="32Gi", shm_size="8Gi", timeout_s=7200)
    job = build_job(request, opts, plan_for(request, opts), "team-a")
    assert trainer_webhook_errors(job) == []
    spec, trainer = job["spec"], job["spec"]["trainer"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    assert spec["activeDeadlineSeconds"] == 7200 and "elasticPolicy" not in json.dumps(job)
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (3, 2, opts.image)
    assert trainer["resourcesPerNode"] == {"requests": {"cpu": "8", "memory": "32Gi"},
                                           "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"}}
    env = {e["name"]: e for e in trainer["env"]}
    assert not [n for n in env if n.startswith("PET_")]  # Trainer v2 injects those; setting them is refused
    for var in ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "kfyolo-s3", "key": var}}}
    script = trainer["command"][2]
    assert trainer["command"][:2] == ["bash", "-c"] and 'exec torchrun --nnodes "${PET_NNODES}"' in script
    assert f"--resume s3://kfyolo/jobs/kfyolo-{RUN}/block1/run/weights/last.pt" in script
    (patch,) = spec["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = rjob["template"]["spec"]["template"]
    assert rjob["name"] == "node" and pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["spec"]["volumes"]
    (c,) = pod["spec"]["containers"]
    assert c["name"] == "node" and "env" not in c and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert job["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    # The webhook rules can fail: a reserved variable, a container the runtime lacks, an unknown runtime.
    bad = json.loads(json.dumps(job))
    bad["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "4"})
    pod_spec = bad["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_spec["template"]["spec"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert len(trainer_webhook_errors(bad)) == 2
    bad["spec"]["runtimeRef"]["name"] = "nowhere"
    assert trainer_webhook_errors(bad) == ["spec.runtimeRef.name: ClusterTrainingRuntime 'nowhere' not found"]


def test_kfp_secret_and_options_a_trainjob_cannot_take(s3, tmp_path, dataset):
    request = _request(tmp_path)
    opts = _opts(secret=S3Secret("mlpipeline-minio-artifact", "http://minio-service.kubeflow:9000"))
    env = build_job(request, opts, plan_for(request, opts), "kubeflow")["spec"]["trainer"]["env"]
    assert {"name": "S3_ENDPOINT", "value": "http://minio-service.kubeflow:9000"} in env
    with pytest.raises(ValueError, match="Trainer v2 has no elastic mode"):
        run_trainjob(request, _opts(elastic_min=1, elastic_max=3), dataset, cluster=FakeCluster())
    with pytest.raises(ValueError, match="not a Kubernetes object name"):
        _opts(runtime="Torch Distributed")
    with pytest.raises(ValueError, match="world size 2 != 3 node"):
        _run(request, _opts(nodes=3), dataset, FakeCluster())


def test_the_component_runs_a_trainjob_with_its_parameters(s3, tmp_path, dataset, monkeypatch):
    request = _request(tmp_path, world_size=4)
    opts = _opts(nodes=4, timeout_s=3600, runtime="torch-distributed")
    cluster = FakeCluster(script=(Step("Complete"),), on_create=_pods_write(request, opts))
    monkeypatch.setattr(KubernetesCluster, "connect", classmethod(
        lambda cls, namespace="", kind=None: cluster if kind is TRAINJOB else pytest.fail(f"kind {kind}")))
    model = Model(name="model", uri=str(request.run_dir))
    train_block.component("kfyolo:test").python_func(
        dataset=Dataset(name="d", uri=str(dataset)), class_weights=Artifact(name="cw", uri=request.class_weights),
        block=0, blocks=3, epochs_per_block=2, cfg="yolov5n", weights="", imgsz=64, batch_size=4, workers=4,
        image_weights=False, hyp_overrides="", seed=0, device="", launcher="trainjob", model=model, run_id=RUN,
        job_image=opts.image, s3_prefix=opts.s3_prefix, timeout_s=3600)
    assert model.metadata["trainjob"] == f"kfyolo-{RUN}-b0" and model.metadata["launcher"] == "trainjob"
    assert cluster.jobs == {} and ("create", f"kfyolo-{RUN}-b0") in cluster.calls


# ------------------------------------------------------------------------------------ status and the API

def test_trainjob_status_reads_conditions_by_type_and_active_jobs():
    def state(conditions=(), active=0):
        return TrainJobState.from_object({"metadata": {"annotations": {SPEC_HASH_ANNOTATION: "h"}}, "status": {
            "conditions": [dict(zip(("type", "status", "reason", "message"), c)) for c in conditions],
            "jobsStatus": [{"name": "node", "active": active, "ready": 0, "succeeded": 0, "failed": 0,
                            "suspended": 0}]}}, restarts=1)

    assert state().phase == "Pending" and state(active=1).phase == "Running" and state(active=1).restarts == 1
    done = state([("Suspended", "False", "Resumed", ""), ("Complete", "True", "JobSetCompleted", "done")])
    assert done.phase == "Complete" and done.succeeded and not done.failed and done.spec_hash == "h"
    failed = state([("Failed", "True", "FailedJobs", "node 1 failed"), ("Created", "True", "", "")])
    assert failed.failed and failed.reason() == "FailedJobs: node 1 failed"
    assert state([("Suspended", "True", "Suspended", "")], active=0).phase == "Suspended"
    assert not state(active=1).succeeded  # a PyTorchJob's "Succeeded" is no TrainJob phase


class _Api:
    """Stub CustomObjectsApi + CoreV1Api for TrainJobs: canned answers, recorded calls."""

    def __init__(self, fail: int = 0, body: str = ""):
        self.fail, self.body, self.seen = fail, body, []

    def create_namespaced_custom_object(self, *args):
        from kubernetes.client.exceptions import ApiException

        self.seen.append(("create", args[:4]))
        if self.fail:
            e = ApiException(status=self.fail, reason="Unprocessable Entity")
            e.body = self.body
            raise e

    def get_namespaced_custom_object(self, *args):
        self.seen.append(("get", args))
        return {"status": {"conditions": [], "jobsStatus": [{"name": "node", "active": 1}]}}

    def delete_namespaced_custom_object(self, *args, body):
        self.seen.append(("delete", args[:4]))

    def list_namespaced_pod(self, namespace, label_selector):
        import datetime
        from types import SimpleNamespace as N

        self.seen.append(("pods", label_selector))
        at = [datetime.datetime(2025, 1, 5, 0, m, tzinfo=datetime.timezone.utc) for m in (0, 5)]
        # node 0's first pod failed and its Job made a new one: the log to follow is the new one's
        return N(items=[N(metadata=N(name="j-node-0-0-a1b2c", creation_timestamp=at[0]), status=N(
                     phase="Failed", container_statuses=[N(restart_count=0)])),
                        N(metadata=N(name="j-node-0-0-x7k2p", creation_timestamp=at[1]), status=N(
                            phase="Running", container_statuses=[N(restart_count=1)]))])

    def read_namespaced_pod_log(self, name, namespace, container, timestamps, since_seconds):
        self.seen.append(("log", name, container))
        return "2025-01-05T00:00:09.5Z epoch 0\n"


def test_kubernetes_cluster_serves_trainjobs_by_the_jobsets_labels():
    api = _Api()
    k = KubernetesCluster("team-a", api, api, kind=TRAINJOB)
    k.create({"metadata": {"name": "j"}})
    assert api.seen[0] == ("create", ("trainer.kubeflow.org", "v1alpha1", "team-a", "trainjobs"))
    state = k.status("j")
    assert isinstance(state, TrainJobState) and state.phase == "Running" and state.restarts == 1
    assert ("pods", "jobset.sigs.k8s.io/jobset-name=j") in api.seen
    assert [line.text for line in k.logs("j")] == ["epoch 0"]
    assert ("pods", "jobset.sigs.k8s.io/jobset-name=j,jobset.sigs.k8s.io/replicatedjob-name=node,"
                    "batch.kubernetes.io/job-completion-index=0") in api.seen
    assert ("log", "j-node-0-0-x7k2p", "node") in api.seen
    k.delete("j")
    assert api.seen[-1] == ("delete", ("trainer.kubeflow.org", "v1alpha1", "team-a", "trainjobs"))
    denied = json.dumps({"kind": "Status", "message": 'admission webhook "validator.trainjob.trainer.kubeflow.org" '
                         "denied the request: spec.trainer.env: must not have reserved envs"})
    with pytest.raises(Exception, match=r"create TrainJob j in namespace team-a: HTTP 422 Unprocessable Entity: "
                                        r"admission webhook .* reserved envs"):
        KubernetesCluster("team-a", _Api(422, denied), _Api(), kind=TRAINJOB).create({"metadata": {"name": "j"}})
    with pytest.raises(Exception, match=r"is Kubeflow Trainer v2 \(the TrainJob CRD\) installed"):
        KubernetesCluster("team-a", _Api(404), _Api(), kind=TRAINJOB).create({"metadata": {"name": "j"}})
