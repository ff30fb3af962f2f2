"""Every TrainJob kfyolo writes, checked as Kubeflow Trainer v2.3.0's API server would (part of `make
lint-k8s`): k8s/trainjob.yaml, the TrainJobs the launcher builds, and those the compiled `--launcher
trainjob` pipeline's train-block steps build at run time from their compiled inputs, each against the
v2.3.0 TrainJob CRD's openAPIV3Schema (strict) and its 19 CEL rules (tests/crd_check.py), on create
and on resubmitting the same object, plus Trainer's admission rules (tests/fake_cluster.py). The
checks are shown to fail on broken objects, by schema and by CEL."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from crd_check import CrdCheck
from fake_cluster import RUNTIMES, trainer_webhook_errors
from pipeline_jobs import RUN_UUID, compiled_jobs, executor_pods

from components.launchers import TrainRequest
from components.launchers.clusterjob import JobOptions, plan_for
from components.launchers.trainjob import build_job
from pipelines.__main__ import main as pipelines_main

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT.parent / "shared" / "k8s" / "trainer-v2.3.0"
K8S_VERSION = "1.37.0"
IMAGE = "registry.example.com/kfyolo:0.1.0"


@pytest.fixture(scope="module")
def check() -> CrdCheck:
    crd = TRAINER / "trainer.kubeflow.org_trainjobs.yaml"
    if not crd.is_file():
        pytest.skip(f"needs the Trainer v2.3.0 CRDs at {TRAINER} (the shared folder is absent outside the workspace)")
    return CrdCheck.load(crd)


def _standalone() -> dict[str, Any]:
    (job,) = [d for d in yaml.safe_load_all((ROOT / "k8s" / "trainjob.yaml").read_text()) if d]
    return job


def _launcher_jobs(tmp_path: Path) -> list[dict[str, Any]]:
    """TrainJobs as the launcher builds them: CPU block 0, a 4-node GPU block 2 with maps, KFP's Secret."""
    from components.launchers.cluster import S3Secret

    jobs = []
    for block, opts in ((0, JobOptions(run_id="r1", image=IMAGE, s3_prefix="s3://kfyolo/p", nodes=2)),
                        (2, JobOptions(run_id="r1", image=IMAGE, s3_prefix="s3://kfyolo/p", nodes=4, gpus_per_node=8)),
                        (1, JobOptions(run_id="r2", image=IMAGE, s3_prefix="s3://mlpipeline/k", secret=S3Secret(
                            "mlpipeline-minio-artifact", "http://minio-service.kubeflow:9000")))):
        request = TrainRequest(run_dir=tmp_path, data_yaml="d", block=block, blocks=3, epochs_per_block=2,
                               batch_size=64, world_size=opts.world_size, class_weights="cw.json",
                               maps="maps.json" if block else "")
        jobs.append(build_job(request, opts, plan_for(request, opts), "kubeflow"))
    return jobs


def _accepted(check: CrdCheck, job: dict[str, Any]) -> None:
    """Created, and resubmitted unchanged (the `oldSelf` rules then run: the same object must pass)."""
    assert check.errors(job) == [], check.errors(job)
    assert check.errors(job, old=copy.deepcopy(job)) == []
    assert trainer_webhook_errors(job) == []


# ------------------------------------------------------------------------------------ what we write

def test_every_trainjob_we_write_passes_the_crd_schema_and_cel_rules(check, tmp_path):
    for job in [_standalone(), *_launcher_jobs(tmp_path)]:
        _accepted(check, job)
    evaluated = {r.rule for r in check.evaluated}
    assert "self == oldSelf" in evaluated and "size(self.metadata.name) <= 63" in evaluated


def test_the_crds_19_rules_all_evaluate_at_their_schema_paths(check, tmp_path):
    """A TrainJob with every field a rule hangs on (ours plus initializers, more pod patches and a
    status) passes all 19 rules, each evaluated where it is declared, list items included."""
    assert len(check.rules) == 19
    job = _launcher_jobs(tmp_path)[1]
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0] \
        ["template"]["spec"]["template"]["spec"]
    pod.update({"imagePullSecrets": [{"name": "registry"}], "initContainers": [{"name": "warmup"}],
                "serviceAccountName": "kfyolo", "terminationGracePeriodSeconds": 60})
    job["spec"]["initializer"] = {"dataset": {"storageUri": "s3://kfyolo/datasets/shapes"}, "model": {"storageUri": ""}}
    job["status"] = {"trainerStatus": {"lastUpdatedTime": "2026-01-01T00:00:00Z", "progressPercentage": 40}}
    check.evaluated.clear()
    assert check.errors(job, old=copy.deepcopy(job)) == []
    assert check.evaluated == set(check.rules), sorted({(r.path, r.rule) for r in set(check.rules) - check.evaluated})


def test_a_broken_trainjob_is_rejected_by_the_schema_and_by_cel(check):
    good = check.defaulted(_standalone())
    bad = copy.deepcopy(good)
    bad["spec"]["trainer"]["numNode"] = 2          # misspelt: the server would drop it silently
    bad["spec"]["trainer"]["numProcPerNode"] = "1"  # v2.3.0 takes an integer
    assert set(check.schema_errors(bad)) == {
        "spec.trainer: Additional properties are not allowed ('numNode' was unexpected)",
        "spec.trainer.numProcPerNode: '1' is not of type 'integer'"}
    assert check.cel_errors(bad) == []  # CEL has nothing to say about those

    renamed = copy.deepcopy(good)
    renamed["metadata"]["name"] = "kfyolo_shapes"  # metadata is an untyped object: only the CEL rule sees it
    assert check.schema_errors(renamed) == []
    assert check.errors(renamed) == ["TrainJob kfyolo_shapes: (root): metadata.name must match RFC 1035 DNS label "
                                     "format (rule: self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$'))"]
    changed = copy.deepcopy(good)
    changed["spec"]["trainer"]["numNodes"] = 4  # a TrainJob's trainer is immutable: an update must not touch it
    assert check.errors(changed) == []
    assert check.errors(changed, old=good) == ["TrainJob kfyolo-shapes-v2: spec.trainer: field is immutable "
                                               "(rule: self == oldSelf)"]
    odd = copy.deepcopy(good)
    odd["spec"]["managedBy"] = "someone-else"
    odd["spec"]["initializer"] = {"dataset": {"storageUri": "shapes"}}
    odd["status"] = {"trainerStatus": {"progressPercentage": 10}}
    assert sorted(e.split(": ", 2)[1] for e in check.errors(odd)) == [
        "spec.initializer.dataset.storageUri", "spec.managedBy", "status.trainerStatus"]


# ------------------------------------------------------------------------------------ the compiled pipeline

def test_the_compiled_trainjob_pipeline_and_the_trainjobs_its_steps_create(check, s3, tmp_path, monkeypatch):
    out = tmp_path / "pipeline.yaml"
    assert pipelines_main(["compile", "--out", str(out), "--blocks", "2", "--launcher", "trainjob", "--image", IMAGE,
                           "--workers", "3", "--gpus-per-worker", "2"]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    # No TrainJob object is in the YAML: the step builds it at run time (checked below, from the compiled inputs).
    assert '"kind": "TrainJob"' not in json.dumps(docs) and "kind: TrainJob" not in out.read_text()
    pods = executor_pods(docs)
    for pod in pods.values():
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    env = {e["name"]: e for e in pods["exec-train-block"]["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "kfyolo-s3",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}
    task = docs[0]["root"]["dag"]["tasks"]["train-block-2"]["inputs"]["parameters"]
    assert task["launcher"]["runtimeValue"]["constant"] == "trainjob"
    assert task["runtime"]["runtimeValue"]["constant"] == "torch-distributed"

    jobs = compiled_jobs(tmp_path, docs, monkeypatch, IMAGE)
    assert [j["metadata"]["name"] for j in jobs] == [f"kfyolo-{RUN_UUID}-b0", f"kfyolo-{RUN_UUID}-b1"]
    for job in jobs:
        _accepted(check, job)
        trainer = job["spec"]["trainer"]
        assert (job["kind"], trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == \
            ("TrainJob", 3, 2, IMAGE)
        assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
        assert "AKIA" not in json.dumps(job) and "valueFrom" in json.dumps(trainer["env"])


def test_elastic_is_refused_for_trainjobs_at_compile_time(tmp_path, capsys):
    out = tmp_path / "bad.yaml"
    assert pipelines_main(["compile", "--out", str(out), "--launcher", "trainjob", "--image", IMAGE,
                           "--elastic", "1:4"]) == 2
    assert "Kubeflow Trainer v2 has no elastic mode" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------ the standalone job

def test_the_standalone_trainjob_runs_the_launchers_pod_and_trains_from_s3_to_s3(tmp_path):
    from trainer.train import build_parser

    job, (ref,) = _standalone(), _launcher_jobs(tmp_path)[:1]
    assert job["spec"]["runtimeRef"] == ref["spec"]["runtimeRef"]
    for key in ("env", "resourcesPerNode", "numProcPerNode"):
        assert job["spec"]["trainer"][key] == ref["spec"]["trainer"][key], key

    def pod(j):
        return j["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]

    assert pod(job)["template"]["spec"]["template"]["spec"] == pod(ref)["template"]["spec"]["template"]["spec"]
    assert job["spec"]["runtimePatches"][0]["manager"] == ref["spec"]["runtimePatches"][0]["manager"]
    script = job["spec"]["trainer"]["command"][2]
    torchrun = shlex.split(script.split("exec ", 1)[1].replace("\\\n", " "))
    assert torchrun[:13] == shlex.split(ref["spec"]["trainer"]["command"][2].split("exec ", 1)[1]
                                        .replace("\\\n", " "))[:13]  # torchrun on PET_*, -m trainer.train
    args = build_parser().parse_args(torchrun[13:])
    assert args.data.startswith("s3://kfyolo/datasets/") and args.project == "s3://kfyolo/runs"
    assert args.batch_size % (job["spec"]["trainer"]["numNodes"] * job["spec"]["trainer"]["numProcPerNode"]) == 0


def test_the_fakes_runtime_is_the_shared_torch_distributed_runtime():
    path = TRAINER / "torch_distributed.yaml"
    if not path.is_file():
        pytest.skip(f"needs {path}")
    runtime = yaml.safe_load(path.read_text())
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    offered = {j["name"]: tuple(c["name"] for c in j["template"]["spec"]["template"]["spec"]["containers"])
               for j in jobs}
    assert {runtime["metadata"]["name"]: offered} == RUNTIMES
    assert "torch" in runtime["spec"]["mlPolicy"]  # the torch plugin: PET_* injected, reserved for it
