"""Shared fixtures: the synthetic dataset at test sizes, the shared/ folder, thread limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def _two_threads():
    # CI has 2 cores; more threads only oversubscribe them.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (tests whose DataLoader workers fork), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "datasets" / "coco128").is_dir():
        pytest.skip(f"needs the shared data folder at {SHARED} (absent outside the kfyolo workspace)")
    return SHARED


@pytest.fixture(scope="session")
def synthetic_yaml(tmp_path_factory) -> Path:
    """A small synthetic dataset (32 images at 64 px): 24 train, 8 val."""
    from trainer.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic") / "syn", images=32, seed=3, imgsz=64)


@pytest.fixture(autouse=True, scope="session")
def _label_cache(tmp_path_factory):
    """Keep label caches out of the developer's home folder."""
    os.environ["KFYOLO_CACHE"] = str(tmp_path_factory.mktemp("label-cache"))


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """moto's S3 server on loopback (state reset), bucket `kfyolo`, and the S3 environment pointing at it.
    KFYOLO_CACHE moves to tmp_path/cache so downloads and run staging start empty."""
    import urllib.request

    from s3server import ACCESS_KEY, SECRET_KEY, MotoS3
    from trainer.storage import RetryPolicy, Storage

    server = MotoS3().start()
    urllib.request.urlopen(urllib.request.Request(f"http://{server.endpoint}/moto-api/reset", method="POST"))
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_USE_TLS", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("S3_ENDPOINT", f"http://{server.endpoint}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("KFYOLO_CACHE", str(tmp_path / "cache"))
    Storage.from_env(RetryPolicy(attempts=1))._client.make_bucket("kfyolo")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """An untrained yolov5n with 3 classes as a kfyolo checkpoint: predict and export tests that need
    no ../shared (its scores are low, so they use a low --conf-thres)."""
    from trainer.checkpoint import save_checkpoint
    from trainer.models.yolo import build_model

    torch.manual_seed(0)
    model = build_model("yolov5n", names=["red", "green", "blue"])
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    return save_checkpoint({"model": model.state_dict(), "spec": model.spec.to_dict(), "names": model.names}, path)
