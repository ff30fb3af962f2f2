"""`--compile` (trainer/compiled.py): the compiled model equals eager, a failing compile falls back to
eager with a warning, the model's own errors still surface, and a whole training run compiled lands
where the eager one does.

A small architecture built by the same code as yolov5n (five stride-2 Convs, Detect on the last
three) keeps inductor's cold compile to about half a minute on 2 cores; the training runs use the
aot_eager backend (dynamo and AOTAutograd without code generation), which traces the same graphs.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from trainer import compiled
from trainer.checkpoint import load_checkpoint
from trainer.models.yolo import build_model
from trainer.train import main

SMALL = {"nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0,
         "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
         "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]],
                      [-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]]],
         "head": [[[2, 3, 4], 1, "Detect", ["nc", "anchors"]]]}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ours(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "trainer.compiled"]


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    eager = build_model(SMALL, names=["a", "b", "c"]).train()
    return eager, copy.deepcopy(eager)


def _step(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = compiled.forward(model, x)
    sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_compiled_model_equals_eager_forward_and_backward(caplog):
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("inductor needs a C++ compiler (g++ or $CXX) on CPU")
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def inductor(gm, example_inputs):  # inductor, counting the graphs it is handed
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    eager, model = _pair()
    compiled.compile_in_place(model, inductor)
    assert compiled.is_compiled(model) and list(model.state_dict()) == list(eager.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="trainer.compiled"):
        out, grads = _step(model, x)
    assert graphs and compiled.is_compiled(model) and not _ours(caplog)  # compiled, no fallback
    ref_out, ref_grads = _step(eager, x)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    # BatchNorm's running statistics moved the same way
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_a_failing_compile_falls_back_to_eager_with_the_reason(caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this node")

    eager, model = _pair()
    compiled.compile_in_place(model, broken)
    x = torch.rand(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="trainer.compiled"):
        out, grads = _step(model, x)
    assert not compiled.is_compiled(model)
    assert "no C++ compiler on this node" in caplog.text and "goes on eagerly" in caplog.text
    ref_out, ref_grads = _step(eager, x)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    caplog.clear()
    _step(model, x)  # eager from now on: no second warning
    assert not _ours(caplog)


def test_the_models_own_error_is_raised_by_the_eager_retry(caplog):
    _, model = _pair()
    compiled.compile_in_place(model, "aot_eager")
    with caplog.at_level(logging.WARNING, logger="trainer.compiled"), pytest.raises(RuntimeError, match="channels"):
        compiled.forward(model, torch.rand(1, 4, 64, 64))  # 4 channels into a 3-channel stem
    assert not compiled.is_compiled(model) and "goes on eagerly" in caplog.text


def test_an_uncompiled_model_is_called_as_is():
    eager, other = _pair()
    x = torch.rand(1, 3, 64, 64)
    assert not compiled.is_compiled(eager)
    for a, b in zip(compiled.forward(eager, x), other(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(compiled.CompileError, match="unknown backend 'tensorrtt'.*inductor"):
        compiled.check_backend("tensorrtt")
    assert {"inductor", "aot_eager"} <= set(compiled.backends())


# ------------------------------------------------------------------------------- training runs
def _train(tmp_path: Path, data: Path, name: str, *extra: str) -> tuple[int, Path]:
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    code = main(["--data", str(data), "--cfg", str(cfg), "--imgsz", "64", "--batch-size", "4", "--device", "cpu",
                 "--workers", "0", "--epochs", "2", "--multi-scale", "--seed", "1", "--project", str(tmp_path),
                 "--name", name, *extra])
    return code, tmp_path / name


def test_a_compiled_run_trains_like_the_eager_run(tmp_path, synthetic_yaml, capsys):
    code, run = _train(tmp_path, synthetic_yaml, "compiled", "--compile", "aot_eager")
    said = "".join(capsys.readouterr())
    assert code == 0
    assert "compiled (aot_eager" in said and "goes on eagerly" not in said
    assert _train(tmp_path, synthetic_yaml, "eager")[0] == 0
    rows = {name: list(csv.DictReader((tmp_path / name / "results.csv").open())) for name in ("compiled", "eager")}
    assert len(rows["compiled"]) == len(rows["eager"]) == 2
    for a, b in zip(rows["compiled"], rows["eager"]):  # multi-scale: several input sizes, so recompiles
        for key in ("box", "obj", "cls"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-3, abs=1e-5), key
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    assert not any("_orig_mod" in k for k in ckpt["raw_model"])  # compiled in place: the same keys
    assert yaml.safe_load((run / "opt.yaml").read_text())["compile"] == "aot_eager"


def test_a_bad_backend_fails_before_the_run_folder_is_made(tmp_path, synthetic_yaml, capsys):
    code, run = _train(tmp_path, synthetic_yaml, "bad", "--compile", "tensorrtt")
    assert code == 2 and "unknown backend 'tensorrtt'" in capsys.readouterr().err
    assert not run.exists()


def test_compiled_ddp_with_two_gloo_ranks_trains_like_eager_ddp(tmp_path, synthetic_yaml):
    """trainer.train under torchrun, 2 gloo ranks: each rank compiles its module, DDP wraps it, and
    the gradients' all-reduce runs as without compiling."""
    import subprocess
    import sys

    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    said = {}
    for name, extra in (("compiled", ["--compile", "aot_eager"]), ("eager", [])):
        cmd = [sys.executable, "-m", "trainer.torchrun", "--standalone", "--nproc_per_node", "2", "-m", "trainer.train",
               "--data", str(synthetic_yaml), "--cfg", str(cfg), "--imgsz", "64", "--batch-size", "4",
               "--device", "cpu", "--workers", "0", "--epochs", "1", "--seed", "1", "--project", str(tmp_path),
               "--name", name, *extra]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                              timeout=240)
        said[name] = proc.stdout + proc.stderr
        assert proc.returncode == 0, said[name][-3000:]
    assert "compiled (aot_eager" in said["compiled"] and "goes on eagerly" not in said["compiled"]
    rows = {name: list(csv.DictReader((tmp_path / name / "results.csv").open())) for name in said}
    for key in ("box", "obj", "cls"):
        assert float(rows["compiled"][0][key]) == pytest.approx(float(rows["eager"][0][key]), rel=1e-3, abs=1e-5), key
    a, b = (load_checkpoint(tmp_path / name / "weights" / "last.pt")["raw_model"] for name in said)
    assert list(a) == list(b)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
