"""evaluate: COCO-exact metrics of a block's model on the validation split, and its maps."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def evaluate(model: Input[Model], dataset: Input[Dataset], block: int, imgsz: int, batch_size: int,
             device: str, metrics: Output[Metrics], evaluation: Output[Artifact]) -> None:
    """Evaluate `model`'s weights/last.pt; log P, R, mAP@.5 and mAP@.5:.95 for the KFP UI and write
    metrics.json, maps.json (the next block's image weighting) and plots to `evaluation`."""
    from pathlib import Path

    from components.warm import call

    # In run-local's warm server when there is one (components/warm.py), else in this process.
    record = call("components.work:evaluate_into", dict(
        data=str(Path(dataset.path) / "data.yaml"), weights=str(Path(model.path) / "weights" / "last.pt"),
        imgsz=imgsz, batch_size=batch_size, device=device, out=evaluation.path))
    for key in ("precision", "recall", "map50", "map"):
        metrics.log_metric(key, round(float(record[key]), 6))
    for c in record["per_class"]:
        evaluation.metadata[f"ap_{c['class']}"] = round(c["ap"], 6)
    evaluation.metadata["block"] = block
    print(f"[kfyolo] block {block} evaluation: mAP@.5 {record['map50']:.4f}  mAP@.5:.95 {record['map']:.4f}  "
          f"P {record['precision']:.3f}  R {record['recall']:.3f}")


def component(image: str):
    return dsl.component(evaluate, base_image=image, install_kfp_package=False)
