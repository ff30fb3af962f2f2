"""prepare_dataset: validate a YOLO dataset and write a clean, self-contained copy plus a report."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output


def prepare_dataset(data: str, dataset: Output[Dataset], report: Output[Artifact]) -> None:
    """Check every image and label of `data` (a data YAML, a folder holding data.yaml, or an s3://
    prefix); write the kept files with their data YAML to `dataset` and the report to `report`."""
    import json
    import shutil
    from pathlib import Path

    from trainer.data.prepare import prepare_dataset as prepare

    source = data
    if data.startswith("s3://"):  # downloaded once into the local cache
        from trainer.storage_sync import materialize_data

        source = str(materialize_data(data))
    prepared = prepare(source, dataset.path)
    shutil.copyfile(Path(dataset.path) / "report.json", report.path)
    dataset.metadata.update(prepared.metadata())
    dataset.metadata["names"] = prepared.names
    report.metadata.update({f"{s}_rejected": len(r["rejected"]) for s, r in prepared.reports.items()})
    summary = ", ".join(f"{s}: {r['n_kept']} images, {r['n_labels']} labels, {len(r['rejected'])} rejected"
                        for s, r in prepared.reports.items())
    print(f"[kfyolo] prepared dataset: {summary}")
    print(json.dumps(prepared.reports["train"]["class_counts"]))


def component(image: str):
    return dsl.component(prepare_dataset, base_image=image, install_kfp_package=False)
