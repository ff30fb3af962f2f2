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
