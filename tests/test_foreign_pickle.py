"""The allow-list reader for ultralytics `.pt` files, and weight loading from either checkpoint kind."""

from __future__ import annotations

import builtins
import os
import zipfile
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointError, save_checkpoint
from trainer.models.foreign_pickle import (ForeignCheckpointError, UnsafePickleError, load_foreign_pickle,
                                           read_ultralytics_checkpoint)
from trainer.models.pretrained import load_matching, read_weights
from trainer.models.yolo import build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov5n.pt"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"{WEIGHTS} absent (shared folder not mounted)")
DETECT_CONVS = tuple(f"model.24.m.{i}.{p}" for i in range(3) for p in ("weight", "bias"))


class _ShellPayload:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalPayload:
    def __reduce__(self):
        return builtins.eval, ("__import__('os').getpid()",)


def _zip_with_pickle(path: Path, data: bytes) -> Path:
    """A torch-style archive whose data.pkl is `data`."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", "little")
    return path


def test_shell_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _ShellPayload(marker), "epoch": 1}, path)
    with pytest.raises(UnsafePickleError, match=r"'(os|posix)\.system'"):
        load_foreign_pickle(path)
    assert not marker.exists()
    # Through the public weights loader too: a CheckpointError, still nothing executed.
    with pytest.raises(CheckpointError, match="system"):
        read_weights(path)
    assert not marker.exists()


def test_shell_payload_is_live(tmp_path: Path) -> None:
    # Control for the test above: an unrestricted unpickler really would run the command.
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": _ShellPayload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_eval_payload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "eval.pt"
    torch.save({"model": _EvalPayload()}, path)
    # Protocol 2 writes builtins as Python 2's `__builtin__`.
    with pytest.raises(UnsafePickleError, match=r"'(builtins|__builtin__)\.eval'"):
        load_foreign_pickle(path)


@pytest.mark.parametrize("module,name", [
    ("models.common", "os"),       # an allowed module, but not an allowed class
    ("subprocess", "Popen"),
    ("torch", "load"),
    ("__builtin__", "eval"),
    ("builtins", "eval"),
    ("builtins", "getattr"),
    ("torch._utils", "_rebuild_tensor"),
])
def test_globals_outside_the_allow_list(tmp_path: Path, module: str, name: str) -> None:
    # Protocol-0 GLOBAL opcode: c<module>\n<name>\n, then STOP.
    path = _zip_with_pickle(tmp_path / "g.pt", f"c{module}\n{name}\n.".encode())
    with pytest.raises(UnsafePickleError, match=f"'{module}.{name}'"):
        load_foreign_pickle(path)


def test_plain_tensors_round_trip(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    saved = {"a": base, "view": base[1:, ::2], "half": torch.tensor([0.5, -2.0], dtype=torch.float16),
             "long": torch.tensor([7, 8], dtype=torch.int64), "names": ["x", "y"], "n": 3}
    path = tmp_path / "plain.pt"
    torch.save(saved, path)
    got = load_foreign_pickle(path)
    assert set(got) == set(saved)
    for key in ("a", "view", "half", "long"):
        assert got[key].dtype == saved[key].dtype
        torch.testing.assert_close(got[key], saved[key])
    assert got["view"].tolist() == [[4.0, 6.0], [8.0, 10.0]]
    assert got["names"] == ["x", "y"] and got["n"] == 3


def test_not_a_zip_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("just text")
    with pytest.raises(ForeignCheckpointError, match="not a torch zip checkpoint"):
        load_foreign_pickle(bad)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_foreign_pickle(tmp_path / "absent.pt")
    empty_zip = tmp_path / "empty.pt"
    with zipfile.ZipFile(empty_zip, "w") as z:
        z.writestr("readme.txt", "no pickle here")
    with pytest.raises(ForeignCheckpointError, match="found 0"):
        load_foreign_pickle(empty_zip)


@needs_weights
def test_official_yolov5n_checkpoint() -> None:
    foreign = read_ultralytics_checkpoint(WEIGHTS)
    assert len(foreign.state_dict) == 349
    assert len(foreign.names) == 80
    assert foreign.names[0] == "person" and foreign.names[45] == "bowl" and foreign.names[-1] == "toothbrush"
    assert foreign.stride == [8.0, 16.0, 32.0]
    assert foreign.yaml["nc"] == 80 and foreign.yaml["width_multiple"] == 0.25
    assert foreign.state_dict["model.0.conv.weight"].shape == (16, 3, 6, 6)
    assert foreign.state_dict["model.24.anchors"].tolist()[0][0] == [1.25, 1.625]  # 10/8, 13/8 px


@needs_weights
def test_read_weights_ultralytics() -> None:
    weights = read_weights(WEIGHTS)
    assert weights.origin == "ultralytics"
    assert len(weights.state_dict) == 349 and len(weights.names) == 80
    floats = [v for v in weights.state_dict.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)  # fp16 on disk, fp32 for loading


@needs_weights
def test_load_matching_other_class_count() -> None:
    torch.manual_seed(0)
    model = build_model("yolov5n", nc=3)
    fresh_detect = {k: v.clone() for k, v in model.state_dict().items() if k in DETECT_CONVS}
    weights = read_weights(WEIGHTS)
    report = load_matching(model, weights)
    assert set(report.shape_mismatch) == set(DETECT_CONVS)
    assert len(report.loaded) == 349 - len(DETECT_CONVS)
    assert report.missing == () and report.unexpected == ()
    state = model.state_dict()
    torch.testing.assert_close(state["model.0.conv.weight"], weights.state_dict["model.0.conv.weight"])
    torch.testing.assert_close(state["model.24.anchors"], weights.state_dict["model.24.anchors"])
    for key, value in fresh_detect.items():
        torch.testing.assert_close(state[key], value)  # kept their fresh initialisation


def test_read_weights_kfyolo_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model("yolov5n", names=["cat", "dog"])
    path = save_checkpoint({"model": source.state_dict(), "spec": source.spec.to_dict(),
                            "names": source.names, "epoch": 4}, tmp_path / "weights" / "last.pt")
    weights = read_weights(path)
    assert weights.origin == "kfyolo"
    assert weights.names == ["cat", "dog"] and weights.spec["nc"] == 2
    torch.manual_seed(1)
    target = build_model(weights.spec, names=weights.names)
    assert not torch.equal(target.model[0].conv.weight, source.model[0].conv.weight)
    report = load_matching(target, weights)
    assert len(report.loaded) == len(source.state_dict())
    assert report.shape_mismatch == report.missing == report.unexpected == ()
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_read_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        read_weights(tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{bad}.*neither a kfyolo checkpoint"):
        read_weights(bad)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_in_one_short_line(tmp_path: Path) -> None:
    """Both loaders refuse it without running it, say why in one line, and never suggest unsafe loading."""
    from trainer.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(marker)), "spec": {}, "names": []}, evil)
    for load in (read_weights, load_checkpoint):
        with pytest.raises(CheckpointError) as e:
            load(evil)
        text = str(e.value)
        assert "\n" not in text and len(text) - len(str(evil)) < 200, text
        assert "refused" in text and "system" in text and "weights_only" not in text
    assert not marker.exists()
