"""The heavy halves of the evaluate, export-model and report steps, kept out of the component
modules so that they import no kfp: in a local run they execute in a fork of the warm server
(components/warm.py), elsewhere in the step's own process. Each takes and returns JSON."""

from __future__ import annotations


def evaluate_into(data: str, weights: str, imgsz: int, batch_size: int, device: str, out: str) -> dict:
    """trainer.evaluate into the folder `out`; its metrics record (JSON: it is also metrics.json)."""
    from pathlib import Path

    from trainer.evaluate import EvalOptions, evaluate
    from trainer.memory import keep_freed_memory

    keep_freed_memory()  # the process is the evaluation's own (trainer/memory.py)
    folder = Path(out)
    return evaluate(EvalOptions(data=data, weights=weights, imgsz=imgsz, batch_size=batch_size, device=device,
                                project=str(folder.parent), name=folder.name, exist_ok=True, workers=2))


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


def report_into(run_dir: str, evaluations: list[str], html: str, markdown: str, epochs_per_block: int,
                dataset_report: dict | None, study: str, predictions: str) -> None:
    """trainer.report's HTML and Markdown for the run folder `run_dir` and its evaluations."""
    from pathlib import Path

    from trainer.report import build_markdown, build_report

    summary = build_report(Path(run_dir), [Path(e) for e in evaluations], Path(html), epochs_per_block=epochs_per_block,
                           dataset_report=dataset_report, study=Path(study) if study else None,
                           predictions=Path(predictions) if predictions else None)
    Path(markdown).write_text(build_markdown(summary))
