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
    done = call("components.work:export_into", dict(
        weights=str(Path(model.path) / "weights" / "last.pt"), data=str(Path(dataset.path) / "data.yaml"),
        imgsz=imgsz, samples=samples, folder=onnx_model.path, predictions=predictions.path))
    onnx_model.metadata.update(done["onnx"])
    predictions.metadata.update(done["predictions"])
    print(done["summary"])


def component(image: str):
    return dsl.component(export_model, base_image=image, install_kfp_package=False)
