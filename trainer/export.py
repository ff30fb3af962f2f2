"""Export a detector for serving (ONNX Runtime, Triton, KServe) and check the export against PyTorch.

    python -m trainer.export --weights runs/train/exp/weights/best.pt --format onnx --data data.yaml
    python -m trainer.export --weights ../shared/weights/yolov5n.pt --format onnx --imgsz 640 \\
        --check-source ../shared/datasets/coco128/images/train2017 [--opset 17] [--no-dynamic-batch] [--no-dynamic-size]
    python -m trainer.export --weights best.pt --format torchscript            # -> best.torchscript
    python -m trainer.export --weights yolov5n.pt --format checkpoint --out y5n-kfyolo.pt   # = trainer.export_weights

The exported model is the Conv+BN-fused copy (`YoloModel.fused()`) with the box decode inside:
input `images` (B, 3, H, W) float32 RGB in [0, 1], letterboxed as `trainer.predict` does; output
`predictions` (B, N, 5 + nc): cx, cy, w, h in input pixels, objectness, class probabilities. NMS is
the server's (`trainer.predict` runs it). Batch and input size are dynamic unless switched off
(H and W must then be multiples of the stride); a fixed-size model is fed images letterboxed into
its size. Beside the model (model.onnx -> model.json, and inside it) goes its metadata: class names,
stride, imgsz, input layout and normalisation, output layout, kfyolo version and the parity figures.

The ONNX exporter is torch's TorchScript-based one (`torch.onnx.export(..., dynamo=False)`): torch
2.13 defaults to the torch.export-based exporter, which needs `onnxscript` (and `onnx-ir`) on top of
`onnx`, and the tracing exporter turns the decode's grid size into graph shape ops, so one file
serves every batch and input size. It needs only `onnx`, and the parity check below holds it to
the PyTorch model.

After every export a parity check runs the exported file in its own runtime (ONNX Runtime,
`torch.jit.load`, or the checkpoint reader) against the PyTorch model on the same letterboxed
images: the max |difference| of the raw outputs must stay within BOX_RTOL of the input side on
the boxes (0.016 px at 640) and SCORE_ATOL on the scores, and the detections after NMS must be
identical (count, classes and order; corners within BOX_RTOL of the image's long side).
Images: `--check-source`, or the val split of `--data`; with neither, one seeded noise image checks
the raw outputs only (and says so).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from trainer import __version__
from trainer.checkpoint import CheckpointError
from trainer.data.augment import PAD_VALUE
from trainer.data.config import DataConfigError, load_data_config, resolve_split
from trainer.inference.metadata import (INPUT_NAME, METADATA_KEY, OUTPUT_NAME, ModelMetadata, input_spec,
                                        output_spec, sidecar)
from trainer.inference.preprocess import RECT_PAD, ImageError
from trainer.inference.runtime import RuntimeSetupError
from trainer.inference.sources import ImageReader, SourceError, SourceItem, expand_source
from trainer.models.foreign_pickle import UnsafePickleError
from trainer.models.pretrained import model_from_weights
from trainer.models.yolo import YoloModel
from trainer.predict import Predictor

log = logging.getLogger("trainer")
FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript", "checkpoint": ".pt"}
OPSETS = range(11, 21)  # the TorchScript-based exporter stops at 20; 11 brought the Range op the grid needs
# fp32 runtimes differ by float summation order only, so box errors grow with the coordinates: the
# tolerance is a fraction of the input side (of the original image's long side after NMS and scaling
# back). Measured with yolov5n on COCO128: 1.4e-3 px at 320 and 3.4e-3 px at 640 (5e-6 of the side),
# scores 5e-6 and 9e-6.
BOX_RTOL, SCORE_ATOL = 2.5e-5, 1e-4


class ExportError(RuntimeError):
    """An export that failed or does not match the PyTorch model; the message says where."""


class DecodedOutputs(nn.Module):
    """What gets exported: the fused model plus the box decode. (B, 3, H, W) -> (B, N, 5 + nc)."""

    def __init__(self, model: YoloModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict(images)


@dataclass(frozen=True)
class ExportOptions:
    weights: str
    format: str = "onnx"
    out: str = ""  # default: beside --weights with the format's suffix
    imgsz: int = 640
    batch_size: int = 1  # the fixed batch without --dynamic-batch, and the traced example's
    dynamic_batch: bool = True
    dynamic_size: bool = True
    opset: int = 17
    data: str = ""  # a data YAML: the parity check uses its val images
    check_source: str = ""  # or any --source of trainer.predict
    check_images: int = 8
    conf_thres: float = 0.25
    iou_thres: float = 0.45


@dataclass(frozen=True)
class ParityReport:
    """The exported model against PyTorch on the same inputs."""

    runtime: str
    images: int
    max_abs_box: float  # raw outputs' xywh, input pixels
    max_abs_score: float  # raw outputs' objectness and class probabilities
    detections: int  # after NMS, PyTorch's count over the images
    mismatched: tuple[str, ...]  # images whose detections differ
    detections_checked: bool  # False when only noise was available
    box_tolerance: float  # px: BOX_RTOL x the largest input side checked

    @property
    def ok(self) -> bool:
        return self.max_abs_box <= self.box_tolerance and self.max_abs_score <= SCORE_ATOL and not self.mismatched

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mismatched": list(self.mismatched), "ok": self.ok,
                "tolerance": {"box_px": self.box_tolerance, "score": SCORE_ATOL,
                              "detection_box": f"{BOX_RTOL:g} x the image's long side"}}

    def summary(self) -> str:
        dets = (f"detections after NMS {'identical' if not self.mismatched else 'DIFFERENT on ' + ', '.join(self.mismatched)}"
                f" ({self.detections} boxes)" if self.detections_checked else "detections not checked (no images given)")
        return (f"parity {self.runtime} vs torch on {self.images} image(s): raw max |diff| boxes {self.max_abs_box:.2e} px "
                f"(tolerance {self.box_tolerance:.2g}), scores {self.max_abs_score:.2e} (tolerance {SCORE_ATOL:g}); {dets}")


def same_detections(a, b) -> bool:
    """Two `Detections` agree: same boxes in the same order, same classes, scores and corners within tolerance."""
    return (len(a) == len(b) and np.array_equal(a.classes, b.classes)
            and bool(np.all(np.abs(a.boxes - b.boxes) <= BOX_RTOL * max(a.shape)))
            and bool(np.all(np.abs(a.scores - b.scores) <= SCORE_ATOL)))


def check_parity(reference: Predictor, exported: Predictor, frames: Sequence[tuple[str, np.ndarray]]) -> ParityReport:
    """Run both on each image's letterboxed input (the exported model's, in case its size is fixed)."""
    checked = bool(frames)
    if not frames:  # raw outputs only: a seeded noise image
        frames = [("noise", np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))]
    box = score = 0.0
    n_dets, mismatched, side = 0, [], 0
    for name, image in frames:
        lb = exported.preprocess(image)
        side = max(side, *lb.chw.shape[1:])
        ref = reference.session(lb.chw[None]).cpu()  # (1, N, 5 + nc)
        out = exported.session(lb.chw[None]).cpu()
        if ref.shape != out.shape:
            raise ExportError(f"{name}: the exported model outputs {tuple(out.shape)}, torch {tuple(ref.shape)}")
        diff = (ref - out).abs()
        box, score = max(box, float(diff[..., :4].max())), max(score, float(diff[..., 4:].max()))
        (a,), (b,) = reference.postprocess(ref, [lb], [name]), exported.postprocess(out, [lb], [name])
        n_dets += len(a)
        if checked and not same_detections(a, b):
            mismatched.append(name)
    return ParityReport(exported.session.kind, len(frames), box, score, n_dets, tuple(mismatched), checked,
                        BOX_RTOL * side)


def check_frames(opt: ExportOptions) -> list[tuple[str, np.ndarray]]:
    """Up to check_images readable images of --check-source or --data's val split; unreadable ones are skipped."""
    if opt.check_source:
        items = expand_source(opt.check_source)
    elif opt.data:
        items = [SourceItem(str(p)) for p in resolve_split(load_data_config(opt.data).split("val"))]
    else:
        return []
    reader, frames = ImageReader(), []
    try:
        for item in items:
            if len(frames) == opt.check_images:
                break
            try:
                frames.append((item.name, reader.read(item)))
            except ImageError as e:
                log.warning("parity check: skipped %s", e)
    finally:
        reader.close()
    return frames


def _onnx(module: nn.Module, example: torch.Tensor, out: Path, opt: ExportOptions) -> None:
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {}, OUTPUT_NAME: {}}
    if opt.dynamic_batch:
        axes[INPUT_NAME][0] = axes[OUTPUT_NAME][0] = "batch"
    if opt.dynamic_size:
        axes[INPUT_NAME].update({2: "height", 3: "width"})
        axes[OUTPUT_NAME][1] = "anchors"
    with warnings.catch_warnings():
        # "legacy TorchScript-based ONNX export" and tracer notes: the choice is deliberate (module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), str(out), dynamo=False, opset_version=opt.opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={k: v for k, v in axes.items() if v} or None, do_constant_folding=True)


def _embed(out: Path, fmt: str, meta: ModelMetadata, traced: torch.jit.ScriptModule | None) -> None:
    """Put the metadata inside the model file too, so it travels without its sidecar."""
    if fmt == "onnx":
        import onnx

        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        del model.metadata_props[:]
        model.metadata_props.add(key=METADATA_KEY, value=meta.to_json())
        model.producer_name = f"kfyolo {__version__}"
        onnx.save(model, str(out))
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still what Triton loads
            torch.jit.save(traced, str(out), _extra_files={f"{METADATA_KEY}.json": meta.to_json()})
    sidecar(out).write_text(meta.to_json() + "\n")


def default_out(weights: str, fmt: str) -> Path:
    suffix = FORMATS[fmt]
    path = Path(weights)
    return path.with_name(path.stem + "-kfyolo.pt") if fmt == "checkpoint" else path.with_suffix(suffix)


def export(opt: ExportOptions) -> tuple[Path, ModelMetadata, ParityReport]:
    """Write the model and its metadata, then check it; returns (model path, metadata, parity).
    Raises ExportError when the exported model does not match PyTorch (the files stay, for a look)."""
    if opt.format not in FORMATS:
        raise ValueError(f"--format {opt.format!r}: expected one of {', '.join(FORMATS)}")
    if opt.opset not in OPSETS:
        raise ValueError(f"--opset {opt.opset}: the exporter supports {OPSETS.start}-{OPSETS.stop - 1}")
    if opt.batch_size < 1 or opt.check_images < 0:
        raise ValueError("--batch-size must be >= 1 and --check-images >= 0")
    if opt.format == "onnx":
        try:
            import onnx  # noqa: F401 - checked here so a missing extra fails before any work
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise ExportError(f"--format onnx needs onnx and onnxruntime ({e}); install kfyolo's export extra: "
                              "uv sync --extra export, or pip install 'kfyolo[export]'") from e
    model, source = model_from_weights(opt.weights)
    stride = max(int(model.stride.max()), 32)
    if opt.imgsz < stride or opt.imgsz % stride:
        raise ValueError(f"--imgsz {opt.imgsz} must be a positive multiple of the model's max stride {stride}")
    out = Path(opt.out) if opt.out else default_out(opt.weights, opt.format)
    if out.suffix.lower() != FORMATS[opt.format]:
        raise ValueError(f"--out {out}: a {opt.format} model's file name must end in {FORMATS[opt.format]}")
    if out.resolve() == Path(opt.weights).resolve():
        raise ValueError(f"--out {out} would overwrite --weights")
    frames = check_frames(opt)  # read first: a wrong --data or --check-source fails before any export work
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = ModelMetadata(
        format=opt.format, names=tuple(model.names), stride=stride, strides=tuple(int(s) for s in model.stride.tolist()),
        imgsz=opt.imgsz, batch=None if opt.dynamic_batch else opt.batch_size,
        input_hw=None if opt.dynamic_size else (opt.imgsz, opt.imgsz), kfyolo_version=__version__,
        source=str(opt.weights), source_format=source.origin, opset=opt.opset if opt.format == "onnx" else None,
        fused=opt.format != "checkpoint",
        exporter={"onnx": f"torch.onnx.export(dynamo=False), torch {torch.__version__}",
                  "torchscript": f"torch.jit.trace, torch {torch.__version__}", "checkpoint": "trainer.export_weights"}[opt.format],
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        input=input_spec(PAD_VALUE, RECT_PAD), output=output_spec(model.nc))
    started = time.perf_counter()
    traced = None
    if opt.format == "checkpoint":
        from trainer.export_weights import export as export_checkpoint

        export_checkpoint(opt.weights, out)
    else:
        net = model.eval().fused()
        net.detect._grids.clear()  # a cached grid would be traced in as a constant of one input size
        module = DecodedOutputs(net).eval()
        example = torch.zeros(opt.batch_size, 3, opt.imgsz, opt.imgsz)  # (B, 3, H, W)
        try:
            if opt.format == "onnx":
                _onnx(module, example, out, opt)
            else:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still what Triton loads
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    traced = torch.jit.trace(module, example, check_trace=False)
        except Exception as e:  # the exporters raise many types; name the step and the file
            raise ExportError(f"{opt.weights} -> {out}: {opt.format} export failed ({type(e).__name__}: {e})") from e
    _embed(out, opt.format, meta, traced)
    seconds = time.perf_counter() - started
    kw = dict(imgsz=opt.imgsz, conf_thres=opt.conf_thres, iou_thres=opt.iou_thres, device="cpu", amp="off")
    parity = check_parity(Predictor(opt.weights, **kw), Predictor(out, **kw), frames)
    meta = replace(meta, parity=parity.to_dict())
    _embed(out, opt.format, meta, traced)
    log.info("wrote %s (%.1f MB) and %s in %.1f s", out, out.stat().st_size / 1e6, sidecar(out).name, seconds)
    log.info("%s", parity.summary())
    if not parity.ok:
        raise ExportError(f"{out}: the exported model does not match PyTorch: {parity.summary()}")
    return out, meta, parity


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--weights", required=True, help="kfyolo checkpoint or ultralytics YOLOv5 .pt")
    a("--version", action="version", version=f"kfyolo {__version__}")
    a("--format", default="onnx", choices=list(FORMATS))
    a("--out", default="", help="model file (default: beside --weights); the metadata goes beside it as .json")
    a("--imgsz", "--img-size", "--img", dest="imgsz", type=int, default=640,
      help="the size the model is traced and checked at (the fixed size with --no-dynamic-size)")
    a("--batch-size", type=int, default=1, help="the fixed batch with --no-dynamic-batch")
    a("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True, help="batch dimension free (default on)")
    a("--dynamic-size", action=argparse.BooleanOptionalAction, default=True, help="height and width free (default on)")
    a("--opset", type=int, default=17, help=f"ONNX opset ({OPSETS.start}-{OPSETS.stop - 1})")
    a("--data", default="", help="data YAML whose val images the parity check uses")
    a("--check-source", default="", help="images for the parity check (any trainer.predict --source)")
    a("--check-images", type=int, default=8, help="how many images the parity check runs")
    a("--conf-thres", type=float, default=0.25, help="the parity check's detection threshold")
    a("--iou-thres", type=float, default=0.45)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    try:
        export(ExportOptions(**vars(args)))
    except (ValueError, ExportError, CheckpointError, UnsafePickleError, RuntimeSetupError, SourceError,
            DataConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from trainer.runlog import exit_now

    exit_now(main())
