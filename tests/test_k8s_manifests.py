"""Every manifest the project ships or writes, checked as a cluster would check it (what `make lint-k8s`
runs): built-in kinds with kubernetes-validate --strict, PyTorchJobs (elastic ones too) against the
CRD's openAPIV3Schema (strict) and the training operator's admission rules, the compiled cluster
pipeline, RBAC scope, non-root pods and pinned images, no credential anywhere, and the README's cluster
commands. TrainJobs' own CRD and CEL checks are test_trainjob_manifests.py's."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fake_cluster import CRD_PATH, crd_errors, crd_validator, webhook_errors
from kubernetes.client import ApiClient
from pipeline_jobs import compiled_jobs, executor_pods
from s3server import ACCESS_KEY, SECRET_KEY

from components.launchers.cluster import TRAINJOB, S3Secret
from components.launchers.pytorchjob import POD_USER, JobOptions, JobPlan, pod_template
from pipelines.__main__ import main as pipelines_main

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = re.search(r"^K8S_VERSION \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
IMAGE = "registry.example.com/kfyolo:0.1.0"
BUILTIN = ("rbac.yaml", "s3-secret.yaml", "minio.yaml")
SEPARATE = ("minio.yaml", "pytorchjob.yaml", "trainjob.yaml")  # applied on their own, not through the kustomization
PLACEHOLDER = re.compile(r"^<[a-z0-9-]+>$")
SECRET_NAME = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN)", re.I)
SECRET_PATTERNS = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"minioadmin", r"minio123", re.escape(SECRET_KEY),
                                           re.escape(ACCESS_KEY), r"do-not-leak")]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_manifests() -> dict[str, list[dict[str, Any]]]:
    return {p.name: _docs(p) for p in sorted(K8S.glob("*.yaml"))}


@pytest.fixture(scope="module")
def crd():
    if not CRD_PATH.is_file():
        pytest.skip(f"needs the PyTorchJob CRD at {CRD_PATH} (the shared folder is absent outside the workspace)")
    return crd_validator(CRD_PATH)


def _compile(tmp_path: Path, *extra: str, name: str = "pipeline.yaml",
             launcher: str = "pytorchjob") -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path / name
    assert pipelines_main(["compile", "--out", str(out), "--blocks", "2", "--launcher", launcher,
                           "--image", IMAGE, *extra]) == 0
    return out, list(yaml.safe_load_all(out.read_text()))


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside a Deployment, a PyTorchJob or a TrainJob (its runtimePatches' pods, with
    the trainer's image on the `node` container)."""
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "TrainJob":
        pods = [r["template"]["spec"]["template"]["spec"] for patch in doc["spec"]["runtimePatches"]
                for r in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]
        return [{**pod, "containers": [{**c, "image": doc["spec"]["trainer"]["image"]} for c in pod["containers"]]}
                for pod in pods]
    return []


# ------------------------------------------------------------------------------------ built-in kinds

def test_builtin_manifests_pass_kubernetes_validate_strict():
    files = [str(K8S / f) for f in BUILTIN]
    cli = Path(sys.executable).with_name("kubernetes-validate")
    run = subprocess.run([str(cli), "--strict", "-k", K8S_VERSION, *files], capture_output=True, text=True)
    assert run.returncode == 0 and "ERROR" not in run.stdout and "WARN" not in run.stdout, run.stdout + run.stderr
    kinds = sorted(d["kind"] for f in BUILTIN for d in _docs(K8S / f))
    assert kinds == ["Deployment", "PersistentVolumeClaim", "Role", "RoleBinding", "Secret", "Service"]
    assert run.stdout.count(" passed for resource ") == len(kinds)
    assert set(_all_manifests()) == {*BUILTIN, *SEPARATE[1:], "kustomization.yaml"}  # nothing unchecked


def test_strict_validation_catches_a_misspelt_field():
    (deployment,) = [d for d in _docs(K8S / "minio.yaml") if d["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePulPolicy"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------------ PyTorchJobs

def _launcher_jobs(tmp_path: Path, trainjobs: bool = False) -> list[dict[str, Any]]:
    """PyTorchJobs as the launcher builds them: CPU block 0, a 4-node GPU block 2, KFP's Secret, an
    elastic job of 2 to 4 pods; with `trainjobs`, the first three as TrainJobs as well."""
    from components.launchers import TrainRequest, pytorchjob, trainjob
    from components.launchers.clusterjob import plan_for

    configs = [(0, JobOptions(run_id="r1", image=IMAGE, s3_prefix="s3://kfyolo/p", nodes=2)),
               (2, JobOptions(run_id="r1", image=IMAGE, s3_prefix="s3://kfyolo/p", nodes=4, gpus_per_node=8)),
               (1, JobOptions(run_id="r2", image=IMAGE, s3_prefix="s3://mlpipeline/k", secret=S3Secret(
                   "mlpipeline-minio-artifact", "http://minio-service.kubeflow:9000"))),
               (0, JobOptions(run_id="r3", image=IMAGE, s3_prefix="s3://kfyolo/p", nodes=2, elastic_min=2,
                              elastic_max=4))]
    builds = [(pytorchjob.build_job, c) for c in configs]
    builds += [(trainjob.build_job, c) for c in configs[:3]] if trainjobs else []
    jobs = []
    for build, (block, opts) in builds:
        request = TrainRequest(run_dir=tmp_path, data_yaml="d", block=block, blocks=3, epochs_per_block=2,
                               batch_size=64, world_size=opts.world_size, class_weights="cw.json",
                               maps="maps.json" if block else "")
        jobs.append(build(request, opts, plan_for(request, opts), "kubeflow"))
    return jobs


def test_pytorchjobs_match_the_crd_and_the_operators_rules(crd, tmp_path):
    (standalone,) = _docs(K8S / "pytorchjob.yaml")
    jobs = _launcher_jobs(tmp_path)
    for job in [standalone, *jobs]:
        assert crd_errors(job, crd) == [] and webhook_errors(job) == []
    assert jobs[-1]["spec"]["elasticPolicy"] == {"minReplicas": 2, "maxReplicas": 4, "rdzvBackend": "c10d",
                                                 "maxRestarts": 3}
    assert "elasticPolicy" not in jobs[0]["spec"]
    # An elastic job's rendezvous runs on Worker 0's declared port: without them the operator cannot start it.
    elastic = json.loads(json.dumps(jobs[-1]))
    elastic["spec"]["elasticPolicy"]["minReplicas"] = 5
    elastic["spec"]["elasticPolicy"]["rdzvBackends"] = "c10d"
    assert crd_errors(elastic, crd) == ["spec.elasticPolicy: Additional properties are not allowed ('rdzvBackends' "
                                        "was unexpected)"]
    del elastic["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert webhook_errors(elastic) == ["elasticPolicy: minReplicas 5 > maxReplicas 4",
                                       "elasticPolicy: no Worker to run the rendezvous on"]
    # The checks can fail: a misspelt field, a wrong type, two Masters, a renamed container.
    bad = json.loads(json.dumps(standalone))
    bad["spec"]["nprocsPerNode"] = "1"
    bad["spec"]["runPolicy"]["backoffLimit"] = "3"
    assert len(crd_errors(bad, crd)) == 2
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert webhook_errors(bad) == ["Worker: no container named pytorch", "Master replicas must be exactly 1"]


def test_the_standalone_job_runs_the_launchers_pod_and_trains_from_s3_to_s3():
    from trainer.train import build_parser

    (job,) = _docs(K8S / "pytorchjob.yaml")
    pods = _pod_specs(job)
    opts = JobOptions(run_id="x", image=IMAGE, s3_prefix="s3://kfyolo/runs")
    ref = ApiClient().sanitize_for_serialization(pod_template("", opts, JobPlan("x", "s3://kfyolo/p", 0)))["spec"]
    for pod in pods:
        (c,), (rc,) = pod["containers"], ref["containers"]
        assert pod["securityContext"] == ref["securityContext"] and pod["volumes"] == ref["volumes"]
        for key in ("name", "env", "ports", "securityContext", "volumeMounts", "resources"):
            assert c[key] == rc[key], key
    script = pods[0]["containers"][0]["command"][2]
    torchrun = shlex.split(script.split("exec ", 1)[1].replace("\\\n", " "))
    assert torchrun[:11] == ["torchrun", "--nnodes", "${PET_NNODES}", "--nproc_per_node", "${PET_NPROC_PER_NODE}",
                             "--node_rank", "${PET_NODE_RANK}", "--master_addr", "${PET_MASTER_ADDR}",
                             "--master_port", "${PET_MASTER_PORT}"]
    assert torchrun[11:13] == ["-m", "trainer.train"]
    args = build_parser().parse_args(torchrun[13:])
    assert args.data.startswith("s3://kfyolo/datasets/") and args.project == "s3://kfyolo/runs"
    assert args.batch_size % (job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] + 1) == 0


# ------------------------------------------------------------------------------------ compiled pipeline

def test_the_compiled_cluster_pipeline_validates_and_wires_secret_and_gpus(tmp_path):
    _, docs = _compile(tmp_path, "--workers", "3", "--gpus-per-worker", "2")
    pods = executor_pods(docs)
    for pod in pods.values():
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    env_of = {n: {e["name"]: e for e in p["spec"]["containers"][0]["env"]} for n, p in pods.items()}
    for name in ("exec-prepare-dataset", "exec-train-block", "exec-train-block-2", "exec-report"):
        for var in ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env_of[name][var]["valueFrom"]["secretKeyRef"] == {"name": "kfyolo-s3", "key": var}
    assert "AWS_ACCESS_KEY_ID" not in env_of["exec-evaluate"]
    assert "AWS_ACCESS_KEY_ID" not in env_of["exec-class-weights"]
    limits = {n: p["spec"]["containers"][0]["resources"]["limits"] for n, p in pods.items()}
    assert limits["exec-evaluate"] == {"nvidia.com/gpu": "1"} and limits["exec-train-block"] == {}
    params = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert params["workers"]["defaultValue"] == 3
    task = docs[0]["root"]["dag"]["tasks"]["train-block-2"]["inputs"]["parameters"]
    assert task["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert task["gpus_per_worker"]["runtimeValue"]["constant"] == 2
    assert task["job_image"]["runtimeValue"]["constant"] == IMAGE and task["launcher"]["runtimeValue"]["constant"] == \
        "pytorchjob"


def test_kfps_own_secret_is_mapped_and_bad_settings_fail_the_compile(tmp_path, capsys):
    _, docs = _compile(tmp_path, "--s3-secret", "mlpipeline-minio-artifact", "--s3-endpoint",
                       "http://minio-service.kubeflow:9000")
    env = {e["name"]: e for e in executor_pods(docs)["exec-train-block"]["spec"]["containers"][0]["env"]}
    assert env["S3_ENDPOINT"] == {"name": "S3_ENDPOINT", "value": "http://minio-service.kubeflow:9000"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mlpipeline-minio-artifact",
                                                                         "key": "secretkey"}
    task = docs[0]["root"]["dag"]["tasks"]["train-block"]["inputs"]["parameters"]
    assert task["s3_prefix"]["runtimeValue"]["constant"] == "s3://mlpipeline/kfyolo"
    for extra, message in ((["--image", "kfyolo:latest"], "pinned by a tag"),
                           (["--s3-secret", "mlpipeline-minio-artifact"], "holds no endpoint"),
                           (["--memory", "lots"], "not a Kubernetes quantity")):
        out = tmp_path / "bad.yaml"
        assert pipelines_main(["compile", "--out", str(out), "--launcher", "pytorchjob", "--image", IMAGE,
                               *extra]) == 2
        assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("elastic", [(), ("--elastic", "2:4")])
def test_the_jobs_the_compiled_pipeline_creates_match_the_crd(crd, s3, tmp_path, monkeypatch, elastic):
    _, docs = _compile(tmp_path, "--workers", "3", "--gpus-per-worker", "2", *elastic)
    jobs = compiled_jobs(tmp_path, docs, monkeypatch, IMAGE)
    assert [j["metadata"]["name"] for j in jobs] == ["kfyolo-0f6b1c2e-1a2b-4c3d-9e8f-0123456789ab-b0",
                                                      "kfyolo-0f6b1c2e-1a2b-4c3d-9e8f-0123456789ab-b1"]
    for job in jobs:
        assert crd_errors(job, crd) == [] and webhook_errors(job) == []
        assert {k: v["replicas"] for k, v in job["spec"]["pytorchReplicaSpecs"].items()} == {"Master": 1, "Worker": 2}
        container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2" and container["image"] == IMAGE
        assert job["spec"]["nprocPerNode"] == "2"
        policy = job["spec"].get("elasticPolicy", {})
        assert (policy.get("minReplicas"), policy.get("maxReplicas")) == ((2, 4) if elastic else (None, None))
        for pod in _pod_specs(job):  # the pod as a built-in kind, strictly
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod},
                                         K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------------ scope and hygiene

def test_rbac_grants_the_launchers_calls_and_nothing_more():
    role, binding = _docs(K8S / "rbac.yaml")
    rules = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
             for v in rule["verbs"]}
    job_verbs = ("create", "get", "watch", "list", "delete")  # no update or patch: jobs are never edited
    assert rules == {*(("kubeflow.org", "pytorchjobs", v) for v in job_verbs),
                     *(("trainer.kubeflow.org", "trainjobs", v) for v in job_verbs),
                     *(("", "pods", v) for v in ("get", "list", "watch")), ("", "pods/log", "get")}
    assert role["kind"] == "Role" and binding["kind"] == "RoleBinding"  # namespaced, never cluster-wide
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount"
    assert subject["namespace"] == role["metadata"]["namespace"] == binding["metadata"]["namespace"]


def test_pods_run_as_non_root_and_images_are_pinned(tmp_path):
    docs = [d for ds in _all_manifests().values() for d in ds] + _launcher_jobs(tmp_path, trainjobs=True)
    pods = [p for d in docs for p in _pod_specs(d)]
    assert len(pods) >= 14
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == POD_USER
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            name, _, tag = c["image"].rpartition(":")
            assert name and "/" not in tag and tag not in ("", "latest"), c["image"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    base = re.search(r"^ARG BASE=(\S+)", dockerfile, re.M).group(1)
    for image in [base, *[f for f in froms if not f.startswith("$")]]:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
    assert re.search(rf"^USER {POD_USER}:{POD_USER}$", dockerfile, re.M)
    assert "uv sync --frozen" in dockerfile and "COPY pyproject.toml uv.lock" in dockerfile
    uv = re.search(r"^UV_VERSION := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"ghcr.io/astral-sh/uv:{uv} " in dockerfile  # the same uv as `make venv`


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_no_credential_appears_in_any_manifest_pipeline_or_job(tmp_path, monkeypatch):
    # Credentials in the compiling machine's environment must not reach the compiled pipeline.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAABCDEFGHIJKLMNOP")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-0123456789")
    kfp_secret = ("--s3-secret", "mlpipeline-minio-artifact", "--s3-endpoint", "http://minio:9000")
    compiled = [_compile(tmp_path, name="a.yaml")[0], _compile(tmp_path, *kfp_secret, name="b.yaml")[0]]
    texts = {p.name: p.read_text() for p in [*K8S.glob("*.yaml"), ROOT / "Dockerfile", ROOT / "README.md", *compiled]}
    texts.update({f"job{i}": json.dumps(j) for i, j in enumerate(_launcher_jobs(tmp_path, trainjobs=True))})
    for name, text in texts.items():
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), f"{name}: {pattern.pattern}"
    structured = [d for p in [*K8S.glob("*.yaml"), *compiled] for d in yaml.safe_load_all(p.read_text()) if d]
    for node in _walk(structured + _launcher_jobs(tmp_path, trainjobs=True)):
        if isinstance(node.get("name"), str) and SECRET_NAME.search(node["name"]) and "value" in node:
            pytest.fail(f"{node['name']} has a literal value instead of a secretKeyRef")
    (secret,) = _docs(K8S / "s3-secret.yaml")
    assert set(secret["stringData"]) == {"S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(PLACEHOLDER.match(v) for k, v in secret["stringData"].items() if k != "S3_ENDPOINT")
    assert "data" not in secret


def test_the_kustomization_ties_the_manifests_together():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert sorted(resources + list(SEPARATE)) == sorted(p for p in _all_manifests() if p != "kustomization.yaml")
    comment = (K8S / "kustomization.yaml").read_text()
    assert all(f in comment for f in SEPARATE)  # said why they are left out
    rendered = [{**d, "metadata": {**d["metadata"], "namespace": kustomization["namespace"]}}
                for f in resources for d in _docs(K8S / f)]
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert ("Secret", S3Secret().name) in names  # the name the launcher and the compiled steps use
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    refs = {r["secretKeyRef"]["name"] for f in SEPARATE for d in _docs(K8S / f)
            for r in (n.get("valueFrom") for n in _walk(d)) if r}
    assert refs == {S3Secret().name}


# ------------------------------------------------------------------------------------ README

def _section_commands(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip()]


def _kfp_cli_parses(argv: list[str]) -> None:
    """Parse (never run) a kfp CLI command line with kfp's own click definitions."""
    from kfp.cli import cli

    group, ctx = cli.cli, cli.cli.make_context("kfp", list(argv))
    while True:
        # A group's context holds the subcommand and its arguments (click 8.2+ names the first part
        # _protected_args; ctx.protected_args is its deprecated alias).
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return
        name, command, rest = group.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
        group = command


def _check_command(line: str, tmp_path: Path, seen: set[str]) -> None:
    from trainer.data.synthetic import _build_parser as synthetic_parser
    from trainer.storage import parse_endpoint
    from trainer.train import build_parser as train_parser

    argv = shlex.split(line)
    services = {d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]}
                for d in _docs(K8S / "minio.yaml") if d["kind"] == "Service"}
    services["ml-pipeline-ui"] = {80}  # KFP's own UI service (not ours)
    (job,) = _docs(K8S / "pytorchjob.yaml")
    (trainjob,) = _docs(K8S / "trainjob.yaml")
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    if argv[:2] == ["kubectl", "apply"] and "--server-side" in argv:
        # Trainer v2: the version whose CRDs the TrainJobs are checked against (test_trainjob_manifests.py).
        assert re.search(r"training-operator\.git/manifests/overlays/standalone\?ref=v1\.\d+\.\d+$", argv[-1]) or \
            re.search(r"^https://github\.com/kubeflow/trainer\.git/manifests/overlays/(manager|runtimes)"
                      r"\?ref=v2\.3\.0$", argv[-1]), line
    elif argv[:2] == ["kubectl", "apply"]:
        flag = "-k" if "-k" in argv else "-f"
        target = ROOT / argv[argv.index(flag) + 1]
        assert target.exists() and (flag == "-f" or (target / "kustomization.yaml").is_file()), line
        assert argv[argv.index("-n") + 1] == namespace if "-n" in argv else True
    elif argv[:1] == ["kubectl"]:
        assert argv[1:3] == ["-n", namespace], line
        verb = argv[3]
        if verb == "port-forward":
            service, ports = argv[4].split("/", 1)[1], argv[5].split(":")
            assert int(ports[1]) in services[service], line
        elif verb == "get" and argv[4] in ("trainjob", "trainjobs"):
            assert argv[5:6] in ([], ["-w"], [trainjob["metadata"]["name"]]), line
        elif verb == "get":
            assert argv[4] in ("pytorchjob", "pytorchjobs") and argv[5:6] in ([], ["-w"], [job["metadata"]["name"]])
        elif verb == "logs" and "-l" in argv:  # a TrainJob's node 0, by the labels the launcher follows too
            assert argv[argv.index("-l") + 1] == TRAINJOB.master(trainjob["metadata"]["name"]), line
            assert argv[argv.index("-c") + 1] == TRAINJOB.container, line
        elif verb == "logs":
            assert argv[-1] == f"{job['metadata']['name']}-master-0"
        elif verb == "delete":
            assert argv[4:] == ["trainjob", trainjob["metadata"]["name"]], line
        else:
            pytest.fail(f"unchecked kubectl command: {line}")
    elif argv[:2] == ["make", "image"]:
        assert "\nimage:" in (ROOT / "Makefile").read_text()
        seen.add(argv[2].split("=", 1)[1])
    elif argv[:2] == ["docker", "push"]:
        assert argv[2] in seen, "push the image `make image` built"
    elif argv[:1] == ["export"]:
        key, value = argv[1].split("=", 1)
        assert key == "S3_ENDPOINT" and parse_endpoint(value)
    elif argv[:3] == [".venv/bin/python", "-m", "pipelines"]:
        assert pipelines_main(argv[3:]) == 0 and Path(argv[argv.index("--out") + 1]).is_file()  # in tmp_path
    elif argv[:1] == [".venv/bin/kfp"]:
        _kfp_cli_parses(argv[1:])
    elif argv[:3] == [".venv/bin/python", "-m", "trainer.data.synthetic"]:
        synthetic_parser().parse_args(argv[3:])
    elif argv[:3] == [".venv/bin/python", "-m", "trainer.train"]:
        assert train_parser().parse_args(argv[3:]).resume.startswith("s3://kfyolo/runs/shapes/")
    elif argv[:3] == [".venv/bin/python", "-m", "components.launchers.pytorchjob"]:
        from components.launchers.pytorchjob import main as staging_main
        from trainer.storage import Storage

        assert argv[3] == "upload" and argv[5] == "s3://kfyolo/datasets/shapes"
        folder = tmp_path / "shapes"
        (folder / "images").mkdir(parents=True)
        (folder / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
        assert staging_main([argv[3], str(folder), *argv[5:]]) == 0  # the bucket does not exist yet
        assert Storage.from_env().exists("s3://kfyolo/datasets/shapes/data.yaml")
        assert (job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"][2]
                .count("--data s3://kfyolo/datasets/shapes/data.yaml") == 1)
    else:
        pytest.fail(f"README command nobody checks: {line}")


@pytest.mark.parametrize("title", ["Run on Kubeflow", "kubectl only", "Run on Kubeflow Trainer v2"])
def test_every_readme_cluster_command_is_exercised_or_validated(title, s3, tmp_path, monkeypatch):
    from trainer.storage import Storage

    Storage.from_env()._client.remove_bucket("kfyolo")  # `upload --create-bucket` must make it
    monkeypatch.chdir(tmp_path)
    commands = _section_commands(title)
    assert len(commands) >= 6
    seen: set[str] = set()
    for line in commands:
        _check_command(line.rstrip("&").strip(), tmp_path, seen)
