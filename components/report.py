"""report: a self-contained HTML (and Markdown) summary of the whole feedback run."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Model, Output


def report(model: Input[Model], evaluation: Input[Artifact], dataset: Input[Dataset], epochs_per_block: int,
           publish: str, html: Output[HTML], markdown: Output[Markdown], study: str = "",
           exported_model: Input[Model] = None, exported_predictions: Input[Artifact] = None) -> None:
    """mAP per block, AP per class per block, how the image weighting moved, loss curves and sample
    predictions, from the last block's run folder and every block's evaluation. With `publish` (a
    folder or s3:// prefix) the report and the final run folder are also copied there. With `study` (a
    local study.json of bench/study_sampling.py) the uniform baseline stands beside the run. With the
    export step's outputs, the report shows its predicted val images and `publish` also gets the
    exported model folder (model/model.onnx, model/model.json)."""
    import json
    import shutil
    from pathlib import Path

    from components.warm import call

    run_dir = Path(model.path)
    earlier = sorted((run_dir / "evaluations").glob("block*"), key=lambda p: int(p.name[5:]))
    dataset_report = json.loads((Path(dataset.path) / "report.json").read_text()).get("train")
    # In run-local's warm server when there is one (components/warm.py), else in this process.
    call("components.work:report_into", dict(
        run_dir=str(run_dir), evaluations=[str(p) for p in [*earlier, Path(evaluation.path)]], html=html.path,
        markdown=markdown.path, epochs_per_block=epochs_per_block, dataset_report=dataset_report, study=study,
        predictions=exported_predictions.path if exported_predictions is not None else ""))
    where = html.path
    if publish.startswith("s3://"):
        from trainer.storage import Storage

        storage = Storage.from_env()
        storage.upload_dir(run_dir, f"{publish.rstrip('/')}/run")
        storage.upload_file(Path(html.path), f"{publish.rstrip('/')}/report.html")
        if exported_model is not None:
            storage.upload_dir(exported_model.path, f"{publish.rstrip('/')}/model")
        where = f"{publish.rstrip('/')}/report.html"
    elif publish:
        target = Path(publish)
        shutil.copytree(run_dir, target / "run", dirs_exist_ok=True)
        shutil.copyfile(html.path, target / "report.html")
        if exported_model is not None:
            shutil.copytree(exported_model.path, target / "model", dirs_exist_ok=True)
        where = str(target / "report.html")
    print(f"[kfyolo] report: {where}")


def component(image: str):
    return dsl.component(report, base_image=image, install_kfp_package=False)
