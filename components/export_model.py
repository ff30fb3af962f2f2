"""export_model: the final model as ONNX that a serving stack loads, checked against PyTorch, and a few
val images predicted by the exported model for the report."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output


def export_model(model: Input[Model], dataset: Input[Dataset], imgsz: int, onnx_model: Output[Model],
                 predictions: Output[Artifact], samples: int = 4) -> None:
    """Export `model`'s weights/last.pt to `onnx_model`, a folder with model.onnx and model.json (KServe's
    ONNX layout; dynamic batch and size), after the parity check on `samples` val images; then predict
    those images with the exported model (ONNX Runtime) into `predictions` (annotated images, labels,
    predictions.json)."""
    from pathlib import Path

    from components.warm import call

    # In run-local's warm server when there is one (components/warm.py), else in this process.
    done = call("components.export_model:export_into", dict(
        weights=str(Path(model.path) / "weights" / "last.pt"), data=str(Path(dataset.path) / "data.yaml"),
        imgsz=imgsz, samples=samples, folder=onnx_model.path, predictions=predictions.path))
    onnx_model.metadata.update(done["onnx"])
    predictions.metadata.update(done["predictions"])
    print(done["summary"])


def export_into(weights: str, data: str, imgsz: int, samples: int, folder: str, predictions: str) -> dict:
    """The export into `folder` and the predictions into `predictions`; the two artifacts' metadata
    and the summary line (JSON)."""
    from pathlib import Path

    from trainer.data.config import load_data_config, resolve_split
    from trainer.export import ExportOptions, export
    from trainer.predict import PredictOptions, predict

    path, meta, parity = export(ExportOptions(weights=weights, format="onnx", out=str(Path(folder) / "model.onnx"),
                                              imgsz=imgsz, data=data, check_images=samples))
    onnx = {
        "framework": "onnx", "file": path.name, "opset": meta.opset, "imgsz": imgsz, "dynamic": "batch, height, width",
        "stride": meta.stride, "names": list(meta.names), "input": "images (B, 3, H, W) float32 RGB in [0, 1], letterboxed",
        "output": f"predictions (B, N, {5 + len(meta.names)}): cx, cy, w, h (input px), objectness, class probabilities",
        "parity_max_abs_box_px": parity.max_abs_box, "parity_max_abs_score": parity.max_abs_score,
        "parity_detections_identical": not parity.mismatched, "kfyolo_version": meta.kfyolo_version}
    shown = [str(p) for p in resolve_split(load_data_config(data).split("val"))[:samples]]
    out = Path(predictions)
    result = predict(PredictOptions(weights=str(path), source=tuple(shown), imgsz=imgsz, device="cpu",
                                    project=str(out.parent), name=out.name, exist_ok=True))
    return {"onnx": onnx, "predictions": {"images": result["images"], "detections": result["detections"],
                                          "runtime": "onnxruntime"},
            "summary": f"[kfyolo] exported {path.name} ({path.stat().st_size / 1e6:.1f} MB, opset {meta.opset}); "
                       f"{parity.summary()}"}


def component(image: str):
    return dsl.component(export_model, base_image=image, install_kfp_package=False)
