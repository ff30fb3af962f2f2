"""The jobs a compiled cluster pipeline makes, seen without a cluster: each executor as the Pod KFP's
backend would run, and the job object each train-block task's launcher builds from its compiled
parameters. Shared by test_k8s_manifests.py (PyTorchJob) and test_trainjob_manifests.py (TrainJob)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from fake_cluster import FakeCluster, Step
from kfp.dsl import Artifact, Dataset, Model

from components import train_block
from components.launchers import TrainLaunchError
from components.launchers.cluster import KubernetesCluster
from trainer.checkpoint import save_checkpoint

RUN_UUID = "0f6b1c2e-1a2b-4c3d-9e8f-0123456789ab"


def executor_pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each executor as the Pod KFP's backend would run its container (less KFP's own launcher
    wrapping): image, command, env and the Secret's variables from the platform spec, accelerators."""
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    pods = {}
    for name, executor in docs[0]["deploymentSpec"]["executors"].items():
        c = executor["container"]
        env = [{"name": e["name"], "value": e["value"]} for e in c.get("env", [])]
        for ref in platform.get(name, {}).get("secretAsEnv", []):
            env += [{"name": m["envVar"], "valueFrom": {"secretKeyRef": {"name": ref["secretName"],
                                                                         "key": m["secretKey"]}}}
                    for m in ref["keyToEnv"]]
        accelerator = c.get("resources", {}).get("accelerator")
        limits = {accelerator["resourceType"]: str(accelerator["resourceCount"])} if accelerator else {}
        container = {"name": "main", "image": c["image"], "command": c["command"], "args": c["args"], "env": env,
                     "resources": {"limits": limits}}
        pods[name] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name.replace("exec-", "kfyolo-")},
                      "spec": {"containers": [container]}}
    return pods


def compiled_jobs(tmp_path: Path, docs: list[dict[str, Any]], monkeypatch, image: str) -> list[dict[str, Any]]:
    """The job each train-block task creates: its compiled parameters (defaults for pipeline
    parameters, a concrete run id for the placeholder) passed to the component, against a fake
    cluster whose job fails at once (only the manifest matters here). The batch size divides by
    every world size the job may run at."""
    defaults = {k: v.get("defaultValue") for k, v in docs[0]["root"]["inputDefinitions"]["parameters"].items()}
    created: list[dict[str, Any]] = []
    cluster = FakeCluster(script=(Step("Failed", reason="Stop"),), on_create=created.append)
    monkeypatch.setattr(KubernetesCluster, "connect", classmethod(lambda cls, namespace="", kind=None: cluster))
    root = tmp_path / "artifacts"
    ds = root / "dataset"
    (ds / "images").mkdir(parents=True)
    (ds / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    (root / "cw.json").write_text('{"class_weights": [1.0]}')
    save_checkpoint({"model": {}, "spec": {}, "names": [], "epoch": 0}, root / "prev" / "weights" / "last.pt")
    (root / "eval").mkdir()
    (root / "eval" / "maps.json").write_text('{"maps": [0.5]}')
    tasks = {k: t for k, t in docs[0]["root"]["dag"]["tasks"].items() if k.startswith("train-block")}
    for name, task in sorted(tasks.items()):
        kwargs = {}
        for key, value in task["inputs"]["parameters"].items():
            raw = value["runtimeValue"]["constant"] if "runtimeValue" in value else \
                defaults[value["componentInputParameter"]]
            kwargs[key] = raw.replace("{{$.pipeline_job_uuid}}", RUN_UUID) \
                if isinstance(raw, str) else int(raw) if isinstance(raw, float) and raw.is_integer() else raw
        procs = kwargs["gpus_per_worker"] or kwargs["nproc_per_node"]
        elastic = range(kwargs["elastic_min"], kwargs["elastic_max"] + 1)
        nodes = elastic if kwargs["elastic_max"] else [kwargs["workers"]]
        kwargs["batch_size"] = 8 * procs * math.lcm(*nodes)
        previous = {"checkpoint": Model(name="c", uri=str(root / "prev")),
                    "evaluation": Artifact(name="e", uri=str(root / "eval"))} if kwargs["block"] else {}
        with pytest.raises(TrainLaunchError, match="Stop"):
            train_block.component(image).python_func(
                dataset=Dataset(name="d", uri=str(ds)), class_weights=Artifact(name="w", uri=str(root / "cw.json")),
                model=Model(name="m", uri=str(root / name)), **previous, **kwargs)
    return created
