"""The PyTorchJob launcher against an in-process fake cluster (tests/fake_cluster.py) and moto S3:
success, failure with a reason, a pod restart, timeouts, adopting an existing job, deletion during the
wait, API hiccups; the job it builds; and KubernetesCluster over stub API objects."""

from __future__ import annotations

import json
import re

import pytest
from fake_cluster import FakeClock, FakeCluster, Step, webhook_errors
from launcher_cases import block_request, dataset, job_options, pods_write, storage  # noqa: F401
from kfp.dsl import Artifact, Dataset, Model

from components import train_block
from components.launchers import TrainLaunchError, TrainRequest
from components.launchers.cluster import (ClusterError, JobExists, JobState, KubernetesCluster, S3Secret,
                                          normalize_stamp, parse_log)
from components.launchers.pytorchjob import (JobOptions, build_job, job_name, main, plan_for, pod_script,
                                             run_pytorchjob)

RUN = "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"
pytestmark = pytest.mark.timeout(120)  # a watch loop that never ends must fail, not hang CI


def _opts(**kw) -> JobOptions:
    return job_options(RUN, **kw)


_request, _storage, _pods_write = block_request, storage, pods_write


def _run(request, opts, dataset, cluster, clock=None):
    return run_pytorchjob(request, opts, dataset, cluster=cluster, storage=_storage(), clock=clock or FakeClock(),
                          echo=True)


# ------------------------------------------------------------------------------------ outcomes

def test_success_stages_creates_streams_deletes_and_fetches(s3, tmp_path, dataset, capsys):
    request, opts = _request(tmp_path), _opts()
    cluster = FakeCluster(script=(Step("Running", log=("rank 0/2 joined gloo process group",)),
                                  Step(log=("epoch 0 done", "epoch 1 done")), Step("Succeeded", log=("bye",))),
                          on_create=_pods_write(request, opts))
    plan = _run(request, opts, dataset, cluster)
    assert plan.name == f"kfyolo-{RUN}-b0"
    verbs = [v for v, _ in cluster.calls]
    assert verbs[:2] == ["status", "create"] and verbs[-1] == "delete" and plan.name not in cluster.jobs
    st = _storage()
    assert st.exists(f"{plan.dataset_uri}/data.yaml") and st.exists(f"{plan.dataset_uri}/images/train/x.jpg")
    assert st.exists(f"{plan.inputs_uri}/class_weights.json") and not st.exists(f"{plan.inputs_uri}/maps.json")
    assert (request.run_dir / "results.csv").read_text() == "epoch\n0\n1\n"
    out = capsys.readouterr().out
    for line in ("rank 0/2 joined gloo process group", "epoch 1 done", "bye", f"team-a/{plan.name}: Succeeded"):
        assert out.count(line) == 1, line  # streamed once each, in the step's log
    assert out.index("epoch 0 done") < out.index("Succeeded")
    assert "epoch 1 done" in (request.run_dir / "train_block0.log").read_text()


@pytest.mark.parametrize("reason, message", [
    ("PyTorchJobFailed", "PyTorchJob team-a/x is failed because 1 Master replica(s) failed."),
    ("DeadlineExceeded", "PyTorchJob x has failed because it was active longer than specified deadline"),
])
def test_a_failed_job_fails_the_step_with_the_reason(s3, tmp_path, dataset, reason, message):
    request, opts = _request(tmp_path), _opts()
    cluster = FakeCluster(script=(Step("Running", log=("error: --hyp-override lr0=-1: hyp 'lr0' must be > 0",)),
                                  Step("Failed", reason=reason, message=message)),
                          on_create=_pods_write(request, opts))
    with pytest.raises(TrainLaunchError, match=re.escape(f"failed: {reason}: {message}")) as e:
        _run(request, opts, dataset, cluster)
    assert "trainer: error: --hyp-override lr0=-1" in str(e.value)
    assert cluster.calls[-1][0] == "delete"
    assert not (request.run_dir / "weights").exists()  # nothing fetched from a failed job


def test_keep_job_keeps_it_and_a_failed_job_never_passes(s3, tmp_path, dataset, capsys):
    request, opts = _request(tmp_path), _opts(keep_job=True)
    cluster = FakeCluster(script=(Step("Running"), Step("Failed", reason="PyTorchJobFailed")))
    with pytest.raises(TrainLaunchError, match="failed: PyTorchJobFailed"):
        _run(request, opts, dataset, cluster)
    assert "delete" not in [v for v, _ in cluster.calls] and len(cluster.jobs) == 1
    assert "keeping PyTorchJob" in capsys.readouterr().out


def test_a_pod_restart_is_reported_and_the_job_goes_on(s3, tmp_path, dataset, capsys):
    request, opts = _request(tmp_path), _opts()
    cluster = FakeCluster(script=(Step("Running", log=("epoch 0",)), Step("Restarting", restarts=1),
                                  Step("Running", log=("epoch 0 again",)), Step("Succeeded")),
                          on_create=_pods_write(request, opts))
    _run(request, opts, dataset, cluster)
    out = capsys.readouterr().out
    assert "pods have restarted 1 time(s)" in out and ": Restarting" in out
    assert out.count("epoch 0\n") == 1 and out.count("epoch 0 again") == 1


def test_a_job_that_outlasts_the_timeout_is_deleted_and_fails_the_step(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts(timeout_s=60, poll_s=30.0)
    cluster, clock = FakeCluster(script=(Step("Running", log=("still training",)), Step())), FakeClock()
    with pytest.raises(TrainLaunchError, match=r"timed out: still Running after 660 s[\s\S]*still training"):
        _run(request, opts, dataset, cluster, clock)
    assert 660 <= clock.t < 660 + 30  # activeDeadlineSeconds plus the start grace, then one poll
    assert cluster.calls[-1][0] == "delete" and not cluster.jobs


def test_a_job_deleted_during_the_wait_fails_the_step(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts()
    cluster = FakeCluster(script=(Step("Running", log=("epoch 0",)), Step(deleted=True)))
    with pytest.raises(TrainLaunchError, match=r"was deleted while the step waited for it \(last state Running\)"):
        _run(request, opts, dataset, cluster)


def test_api_hiccups_are_retried_but_a_lasting_failure_is_not(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts()
    flaky = FakeCluster(script=(Step(api_error="transient"), Step("Running"), Step(api_error="transient"),
                                Step("Succeeded")), on_create=_pods_write(request, opts))
    _run(request, opts, dataset, flaky)
    broken = FakeCluster(script=(Step("Running"), Step(api_error="fatal")))
    with pytest.raises(TrainLaunchError, match="lost track of PyTorchJob team-a/"):
        _run(_request(tmp_path / "b"), opts, dataset, broken)
    down = FakeCluster(script=(Step(api_error="transient"),))
    with pytest.raises(TrainLaunchError, match=r"HTTP 503"):
        _run(_request(tmp_path / "c"), opts, dataset, down)
    assert [v for v, _ in down.calls].count("status") == 1 + 1 + 5  # the adoption look, a first try, 5 retries


def test_success_without_the_blocks_checkpoint_fails(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts()
    cluster = FakeCluster(on_create=_pods_write(request, opts, epoch=0))  # stop_epoch 2: expected epoch 1
    with pytest.raises(TrainLaunchError, match="is at epoch 0, not the block's last epoch 1"):
        _run(request, opts, dataset, cluster)
    with pytest.raises(TrainLaunchError, match="left no weights/last.pt"):
        _run(_request(tmp_path / "b"), _opts(run_id="other-run"), dataset, FakeCluster())


# ------------------------------------------------------------------------------------ adoption

def test_a_retried_step_adopts_its_running_job_without_staging_again(s3, tmp_path, dataset, capsys):
    request, opts = _request(tmp_path), _opts()
    plan = plan_for(request, opts)
    cluster = FakeCluster()
    cluster.add(build_job(request, opts, plan, cluster.namespace), (Step("Running", log=("epoch 1",)),
                                                                    Step("Succeeded")), ("Created", "Running"))
    _pods_write(request, opts)(None)  # what the job wrote before the first attempt's pod died
    _run(request, opts, dataset, cluster)
    assert "create" not in [v for v, _ in cluster.calls]
    assert not _storage().exists(f"{plan.dataset_uri}/data.yaml")  # no second staging
    assert "adopting PyTorchJob" in capsys.readouterr().out
    assert (request.run_dir / "weights" / "last.pt").is_file()


def test_an_earlier_attempts_failed_job_is_replaced(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts()
    cluster = FakeCluster(on_create=_pods_write(request, opts))
    cluster.add(build_job(request, opts, plan_for(request, opts), cluster.namespace), (Step(),),
                ("Created", "Failed"))
    _run(request, opts, dataset, cluster)
    verbs = [v for v, _ in cluster.calls]
    assert verbs.index("delete") < verbs.index("create")


def test_a_strangers_job_of_the_same_name_is_left_alone(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts(timeout_s=60)
    cluster = FakeCluster()
    other = build_job(request, _opts(cpu="8"), plan_for(request, opts), cluster.namespace)  # same name
    cluster.add(other, (Step("Running"),))
    with pytest.raises(TrainLaunchError, match="was not made from this block's spec"):
        _run(request, opts, dataset, cluster)
    assert [v for v, _ in cluster.calls] == ["status"]


def test_a_create_race_adopts_the_other_attempts_job(s3, tmp_path, dataset):
    request, opts = _request(tmp_path), _opts()

    class Racing(FakeCluster):
        def create(self, job):  # the other attempt wins between our look and our create
            self.add(job, (Step("Running"), Step("Succeeded")))
            super().create(job)

    cluster = Racing(on_create=_pods_write(request, opts))
    _pods_write(request, opts)(None)
    _run(request, opts, dataset, cluster)
    assert [v for v, _ in cluster.calls][:3] == ["status", "create", "status"]


# ------------------------------------------------------------------------------------ the job

def test_the_job_has_master_workers_resources_secret_env_and_run_policy(tmp_path):
    request = _request(tmp_path, block=1, world_size=6)
    opts = _opts(nodes=3, gpus_per_node=2, cpu="8", memory="32Gi", shm_size="8Gi", timeout_s=7200, ttl_s=600)
    job = build_job(request, opts, plan_for(request, opts), "team-a")
    assert webhook_errors(job) == []
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["namespace"] == "team-a" and job["spec"]["nprocPerNode"] == "2"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Master": 1, "Worker": 2}
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 3, "ttlSecondsAfterFinished": 600,
                                        "activeDeadlineSeconds": 7200}
    pod = specs["Worker"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "pytorch" and c["image"] == "registry.example/kfyolo:0.1.0"
    assert c["resources"] == {"requests": {"cpu": "8", "memory": "32Gi"},
                              "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"}}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"mountPath": "/dev/shm", "name": "dshm"} in c["volumeMounts"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["runAsNonRoot"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    env = {e["name"]: e for e in c["env"]}
    for var in ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "kfyolo-s3", "key": var}}}
    script = c["command"][2]
    assert c["command"][:2] == ["bash", "-c"]
    assert 'exec torchrun --nnodes "${PET_NNODES}" --nproc_per_node "${PET_NPROC_PER_NODE}"' in script
    stage = f"s3://kfyolo/jobs/kfyolo-{RUN}"
    assert f"--resume {stage}/block1/run/weights/last.pt" in script
    assert f'fetch {stage}/block1/inputs/class_weights.json "${{KFYOLO_CACHE}}"/job-inputs/class_weights.json' in script
    assert '--maps "${KFYOLO_CACHE}"/job-inputs/maps.json' in script and "$(" not in script


def test_kfp_secret_maps_its_keys_and_takes_the_endpoint_as_a_plain_variable(tmp_path):
    request = _request(tmp_path)
    opts = _opts(secret=S3Secret("mlpipeline-minio-artifact", "http://minio-service.kubeflow:9000"))
    job = build_job(request, opts, plan_for(request, opts), "kubeflow")
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "S3_ENDPOINT", "value": "http://minio-service.kubeflow:9000"} in env
    assert {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {
        "name": "mlpipeline-minio-artifact", "key": "secretkey"}}} in env
    with pytest.raises(ValueError, match="holds no endpoint"):
        S3Secret("mlpipeline-minio-artifact")
    with pytest.raises(ValueError, match="must not carry credentials"):
        S3Secret("kfyolo-s3", "http://user:pw@minio:9000")


def test_job_names_are_deterministic_short_dns_labels():
    assert job_name(RUN, 2) == job_name(RUN, 2) == f"kfyolo-{RUN}-b2"
    assert job_name(RUN, 2) != job_name(RUN, 3) != job_name("another-run", 3)
    long_a, long_b = "Run_" + "x" * 80 + "A", "Run_" + "x" * 80 + "B"
    for name in (job_name(long_a, 1234), job_name("KFP Run #7 (retry)", 0), job_name(long_b, 0)):
        assert len(name) <= 52 and name[0].isalpha() and name.replace("-", "").isalnum() and name.islower()
    assert job_name(long_a, 0) != job_name(long_b, 0)  # cut to length, told apart by a hash
    with pytest.raises(ValueError, match="run_id is empty"):
        _opts(run_id="  ")


@pytest.mark.parametrize("change, match", [
    ({"image": "kfyolo:latest"}, "pinned by a tag"), ({"image": "registry:5000/kfyolo"}, "pinned by a tag"),
    ({"s3_prefix": "/local/runs"}, "s3://bucket/prefix"), ({"memory": "16 GB"}, "not a Kubernetes quantity"),
    ({"nodes": 0}, "nodes and nproc_per_node"),
])
def test_job_options_reject_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        _opts(**change)
    assert _opts(image="registry:5000/kfyolo@sha256:" + "a" * 64).image.endswith("a" * 64)


def test_pod_script_refuses_what_kubernetes_would_expand(tmp_path):
    request = TrainRequest(run_dir=tmp_path, data_yaml="d", block=0, blocks=1, epochs_per_block=1,
                           hyp_overrides=("lr0=$(AWS_SECRET_ACCESS_KEY)",))
    with pytest.raises(ValueError, match="Kubernetes expands"):
        pod_script(request, plan_for(request, _opts()))


def test_world_size_must_match_the_job(s3, tmp_path, dataset):
    with pytest.raises(ValueError, match="world size 2 != 3 node"):
        _run(_request(tmp_path), _opts(nodes=3), dataset, FakeCluster())


def test_the_component_runs_the_launcher_with_its_parameters(s3, tmp_path, dataset, monkeypatch):
    request = _request(tmp_path, world_size=4)
    opts = _opts(nodes=4, timeout_s=3600)
    cluster = FakeCluster(script=(Step("Succeeded"),), on_create=_pods_write(request, opts))  # no real sleeps
    monkeypatch.setattr(KubernetesCluster, "connect", classmethod(lambda cls, namespace="", kind=None: cluster))
    model = Model(name="model", uri=str(request.run_dir))
    train_block.component("kfyolo:test").python_func(
        dataset=Dataset(name="d", uri=str(dataset)), class_weights=Artifact(name="cw", uri=request.class_weights),
        block=0, blocks=3, epochs_per_block=2, cfg="yolov5n", weights="", imgsz=64, batch_size=4, workers=4,
        image_weights=False, hyp_overrides="", seed=0, device="", launcher="pytorchjob", model=model, run_id=RUN,
        job_image=opts.image, s3_prefix=opts.s3_prefix, timeout_s=3600)
    assert model.metadata["pytorchjob"] == f"kfyolo-{RUN}-b0" and model.metadata["world_size"] == 4
    created = build_job(request, opts, plan_for(request, opts), cluster.namespace)
    assert ("create", created["metadata"]["name"]) in cluster.calls
    assert (request.run_dir / "weights" / "last.pt").is_file()


# ------------------------------------------------------------------------------------ cluster.py

def test_job_state_stamps_and_logs():
    state = JobState.from_object({"status": {"conditions": [
        {"type": "Created", "status": "True"}, {"type": "Running", "status": "False"},
        {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": "1 Master failed"}]}})
    assert state.phase == "Failed" and state.reason() == "PyTorchJobFailed: 1 Master failed"
    assert JobState().phase == "Pending" and JobState().reason() == ""
    assert normalize_stamp("2025-01-05T22:58:20.12Z") == "2025-01-05T22:58:20.120000000Z"
    assert normalize_stamp("2025-01-05T22:58:20Z") < normalize_stamp("2025-01-05T22:58:20.000000001Z")
    lines = parse_log("2025-01-05T22:58:20.1Z epoch 0\n  continued\n2025-01-05T22:58:21Z epoch 1\n")
    assert [(line.stamp[17:22], line.text) for line in lines] == [
        ("20.10", "epoch 0"), ("20.10", "  continued"), ("21.00", "epoch 1")]


class _Api:
    """Stub CustomObjectsApi + CoreV1Api: canned answers, recorded calls, optional ApiException."""

    def __init__(self, fail: int = 0):
        self.fail, self.seen = fail, []

    def _maybe_fail(self):
        from kubernetes.client.exceptions import ApiException

        if self.fail:
            raise ApiException(status=self.fail, reason="Boom")

    def create_namespaced_custom_object(self, *args):
        self.seen.append(("create", args[:4]))
        self._maybe_fail()

    def get_namespaced_custom_object(self, *args):
        self._maybe_fail()
        return {"status": {"conditions": [{"type": "Running", "status": "True"}]}}

    def delete_namespaced_custom_object(self, *args, body):
        self.seen.append(("delete", args, body))
        self._maybe_fail()

    def list_namespaced_pod(self, namespace, label_selector):
        from types import SimpleNamespace as N

        self.seen.append(("pods", label_selector))
        cs = [N(restart_count=2)]
        return N(items=[N(metadata=N(name="j-master-0"), status=N(phase="Running", container_statuses=cs))])

    def read_namespaced_pod_log(self, name, namespace, container, timestamps, since_seconds):
        self.seen.append(("log", name, container, since_seconds))
        return "2025-01-05T00:00:01Z old\n2025-01-05T00:00:09.5Z new\n"


def test_kubernetes_cluster_maps_the_api():
    import datetime

    api = _Api()
    now = datetime.datetime(2025, 1, 5, 0, 2, 0, tzinfo=datetime.timezone.utc)
    k = KubernetesCluster("team-a", api, api, now=lambda: now)
    k.create({"metadata": {"name": "j"}})
    assert api.seen[0] == ("create", ("kubeflow.org", "v1", "team-a", "pytorchjobs"))
    state = k.status("j")
    assert state.phase == "Running" and state.restarts == 2
    assert [line.text for line in k.logs("j", since="2025-01-05T00:00:05.000000000Z")] == ["new"]
    assert ("log", "j-master-0", "pytorch", 175) in api.seen  # 115 s back plus a minute of skew
    k.delete("j")
    assert api.seen[-1][2] == {"propagationPolicy": "Foreground"}
    assert KubernetesCluster("team-a", _Api(404), _Api(404)).status("j") is None
    KubernetesCluster("team-a", _Api(404), _Api(404)).delete("j")  # already gone: fine
    with pytest.raises(JobExists):
        KubernetesCluster("team-a", _Api(409), _Api()).create({"metadata": {"name": "j"}})
    with pytest.raises(ClusterError, match="apply k8s/rbac.yaml") as e:
        KubernetesCluster("team-a", _Api(403), _Api()).create({"metadata": {"name": "j"}})
    assert not e.value.transient
    with pytest.raises(ClusterError, match="HTTP 503") as e:
        KubernetesCluster("team-a", _Api(503), _Api()).status("j")
    assert e.value.transient


def test_the_pods_fetch_step(s3, tmp_path, capsys):
    src = tmp_path / "cw.json"
    src.write_text('{"class_weights": [1]}')
    _storage().upload_file(src, "s3://kfyolo/jobs/x/inputs/cw.json")
    assert main(["fetch", "s3://kfyolo/jobs/x/inputs/cw.json", str(tmp_path / "in" / "cw.json")]) == 0
    assert (tmp_path / "in" / "cw.json").read_text() == '{"class_weights": [1]}'
    assert main(["fetch", "s3://kfyolo/jobs/x/missing.json", str(tmp_path / "m.json")]) == 1
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fetch", "s3://kfyolo/jobs/x/inputs/cw.json"])


def test_an_elastic_job_gets_a_c10d_elastic_policy_and_batches_that_fit_every_size(s3, tmp_path, dataset):
    request = _request(tmp_path, world_size=2)
    opts = _opts(nodes=2, elastic_min=1, elastic_max=3)
    job = build_job(request, opts, plan_for(request, opts), "team-a")
    assert job["spec"]["elasticPolicy"] == {"minReplicas": 1, "maxReplicas": 3, "rdzvBackend": "c10d",
                                            "maxRestarts": 3}
    assert webhook_errors(job) == [] and "elasticPolicy" not in build_job(request, _opts(), plan_for(
        request, _opts()), "team-a")["spec"]
    # The batch must divide by every world size the job may run at: 12 does by 1, 2 and 3; 8 not by 3.
    _run(request, opts, dataset, FakeCluster(script=(Step("Succeeded"),), on_create=_pods_write(request, opts)))
    eight = TrainRequest(**{**request.__dict__, "batch_size": 8, "run_dir": tmp_path / "eight"})
    with pytest.raises(ValueError, match=r"batch size 8 must be a multiple of the world size on 3 node\(s\) \(3\)"):
        _run(eight, opts, dataset, FakeCluster())
    for bad, match in (({"elastic_min": 3, "elastic_max": 4}, r"1 <= min <= nodes \(2\) <= max"),
                       ({"nodes": 1, "elastic_min": 1, "elastic_max": 2}, "needs nodes >= 2")):
        with pytest.raises(ValueError, match=match):
            _opts(**{"nodes": 2, **bad})
