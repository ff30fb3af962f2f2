"""class_weights: inverse label frequency of the training split, normalised."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output


def class_weights(dataset: Input[Dataset], weights: Output[Artifact]) -> None:
    """Write {names, class_weights, label_counts} as JSON; the trainer reads it via --class-weights."""
    import json
    from pathlib import Path

    from trainer.data.prepare import class_weight_record

    record = class_weight_record(Path(dataset.path) / "data.yaml")
    Path(weights.path).write_text(json.dumps(record, indent=1))
    weights.metadata.update({n: round(w, 6) for n, w in zip(record["names"], record["class_weights"])})
    # The heaviest first, at most 12 (COCO has 80): the full list is in the artifact and its metadata.
    pairs = sorted(zip(record["names"], record["class_weights"]), key=lambda p: -p[1])
    more = f", ... {len(pairs) - 12} more" if len(pairs) > 12 else ""
    print(f"[kfyolo] class weights: {', '.join(f'{n} {w:.3f}' for n, w in pairs[:12])}{more}")


def component(image: str):
    return dsl.component(class_weights, base_image=image, install_kfp_package=False)
