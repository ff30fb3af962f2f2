"""The feedback pipeline: prepare dataset -> class weights -> K x (train block -> evaluate) -> report.

KFP cannot loop with feedback at run time, so `build_pipeline` unrolls the K blocks in a Python
`for` at compile time: block k resumes block k-1's model and weights its images by evaluation
k-1's maps. Only wiring lives here; every step is a component in components/.
(No `from __future__ import annotations` here: KFP reads the pipeline's real annotations.)
"""

from kfp import dsl

from components import class_weights, evaluate, prepare_dataset, report, train_block

DEFAULT_IMAGE = "kfyolo:0.1.0"  # the project image; set a registry tag at compile time for a cluster
PIPELINE_NAME = "kfyolo-feedback"


def build_pipeline(blocks: int = 3, image: str = DEFAULT_IMAGE, launcher: str = "local"):
    """Return the pipeline function for `blocks` blocks, its steps running in `image`."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    prepare_op = prepare_dataset.component(image)
    weights_op = class_weights.component(image)
    train_op = train_block.component(image)
    evaluate_op = evaluate.component(image)
    report_op = report.component(image)

    @dsl.pipeline(name=PIPELINE_NAME, description=f"YOLOv5 training in {blocks} blocks; each block's evaluation "
                  "(per-class mAP) weights the next block's images by class_weights * (1 - maps)^2.")
    def kfyolo_feedback(data: str, cfg: str = "yolov5n", weights: str = "", imgsz: int = 256,
                        batch_size: int = 16, epochs_per_block: int = 5, workers: int = 2,
                        image_weights: bool = True, hyp_overrides: str = "", seed: int = 0, device: str = "",
                        eval_batch_size: int = 32, publish: str = ""):
        prepared = prepare_op(data=data).set_display_name("prepare dataset")
        dataset = prepared.outputs["dataset"]
        cw = weights_op(dataset=dataset).set_display_name("class weights")
        model = evaluation = None
        for k in range(blocks):
            previous = {"checkpoint": model, "evaluation": evaluation} if k else {}
            train = train_op(dataset=dataset, class_weights=cw.outputs["weights"], block=k, blocks=blocks,
                             epochs_per_block=epochs_per_block, cfg=cfg, weights=weights, imgsz=imgsz,
                             batch_size=batch_size, workers=workers, image_weights=image_weights,
                             hyp_overrides=hyp_overrides, seed=seed, device=device, launcher=launcher,
                             **previous).set_display_name(f"train block {k + 1}/{blocks}")
            model = train.outputs["model"]
            ev = evaluate_op(model=model, dataset=dataset, block=k, imgsz=imgsz, batch_size=eval_batch_size,
                             device=device).set_display_name(f"evaluate block {k + 1}/{blocks}")
            evaluation = ev.outputs["evaluation"]
        report_op(model=model, evaluation=evaluation, dataset=dataset, epochs_per_block=epochs_per_block,
                  publish=publish).set_display_name("report")

    return kfyolo_feedback
