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
    record = call("components.evaluate:evaluate_into", dict(
        data=str(Path(dataset.path) / "data.yaml"), weights=str(Path(model.path) / "weights" / "last.pt"),
        imgsz=imgsz, batch_size=batch_size, device=device, out=evaluation.path))
    for key in ("precision", "recall", "map50", "map"):
        metrics.log_metric(key, round(float(record[key]), 6))
    for c in record["per_class"]:
        evaluation.metadata[f"ap_{c['class']}"] = round(c["ap"], 6)
    evaluation.metadata["block"] = block
    print(f"[kfyolo] block {block} evaluation: mAP@.5 {record['map50']:.4f}  mAP@.5:.95 {record['map']:.4f}  "
          f"P {record['precision']:.3f}  R {record['recall']:.3f}")


def evaluate_into(data: str, weights: str, imgsz: int, batch_size: int, device: str, out: str) -> dict:
    """trainer.evaluate into the folder `out`; its metrics record (JSON: it is also metrics.json)."""
    from pathlib import Path

    from trainer.evaluate import EvalOptions, evaluate
    from trainer.memory import keep_freed_memory

    keep_freed_memory()  # the process is the evaluation's own (trainer/memory.py)
    folder = Path(out)
    return evaluate(EvalOptions(data=data, weights=weights, imgsz=imgsz, batch_size=batch_size, device=device,
                                project=str(folder.parent), name=folder.name, exist_ok=True, workers=2))


def component(image: str):
    return dsl.component(evaluate, base_image=image, install_kfp_package=False)
