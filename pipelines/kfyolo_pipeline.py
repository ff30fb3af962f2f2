"""The feedback pipeline: prepare dataset -> class weights -> K x (train block -> evaluate) -> export -> report.

KFP cannot loop with feedback at run time, so `build_pipeline` unrolls the K blocks in a Python
`for` at compile time: block k resumes block k-1's model and weights its images by evaluation
k-1's maps. Only wiring lives here; every step is a component in components/.
(No `from __future__ import annotations` here: KFP reads the pipeline's real annotations.)
"""

from dataclasses import asdict, dataclass

from kfp import dsl

from components import class_weights, evaluate, export_model, prepare_dataset, report, train_block

DEFAULT_IMAGE = "kfyolo:0.1.0"  # the project image; set a registry tag at compile time for a cluster
PIPELINE_NAME = "kfyolo-feedback"
GPU = "nvidia.com/gpu"
# The sampler a pipeline uses unless told otherwise: the winner of bench/study_sampling.py on the
# long-tail set (rare-class AP 4-7x uniform's and 3-6x rfs's, with a higher mAP; README "Samplers").
# "" would mean classic when image_weights is on, else uniform.
DEFAULT_SAMPLER = "classic"


CLUSTER_LAUNCHERS = ("pytorchjob", "trainjob")


@dataclass(frozen=True)
class ClusterOptions:
    """Compile-time settings of train_block as a PyTorchJob or a Trainer v2 TrainJob (launcher="pytorchjob"
    or "trainjob")."""

    gpus_per_worker: int = 0      # GPUs per pod, one process each; the evaluate steps get one GPU
    nproc_per_node: int = 1       # processes per pod without GPUs
    cpu: str = "4"                # per pod
    memory: str = "16Gi"
    shm_size: str = "2Gi"
    s3_secret: str = "kfyolo-s3"  # or KFP's mlpipeline-minio-artifact (then give s3_endpoint)
    s3_endpoint: str = ""
    s3_prefix: str = "s3://kfyolo/pipelines"  # staging and run folders, kfyolo-<run id>/block<k>/run
    namespace: str = ""           # "" = the pipeline's own namespace
    keep_job: bool = False
    timeout_s: int = 86400
    runtime: str = "torch-distributed"  # TrainJob: the ClusterTrainingRuntime
    elastic_min: int = 0          # PyTorchJob elasticPolicy: pods between these (0: not elastic)
    elastic_max: int = 0


def _use_s3(task: dsl.PipelineTask, cluster: ClusterOptions) -> dsl.PipelineTask:
    """The S3 variables from the Secret (kfp-kubernetes), the endpoint as a plain one when given."""
    from kfp import kubernetes

    from components.launchers.cluster import S3Secret

    secret = S3Secret(cluster.s3_secret, cluster.s3_endpoint)
    kubernetes.use_secret_as_env(task, secret_name=secret.name, secret_key_to_env=secret.keys)
    return task.set_env_variable("S3_ENDPOINT", secret.endpoint) if secret.endpoint else task


def _check_cluster(image: str, cluster: ClusterOptions, launcher: str, workers: int) -> dict:
    """The train_block arguments of a cluster build, after the launcher has checked them."""
    from components.launchers.cluster import S3Secret
    from components.launchers.clusterjob import JobOptions

    opts = JobOptions(run_id="compile-check", image=image, s3_prefix=cluster.s3_prefix, namespace=cluster.namespace,
                      nodes=workers, nproc_per_node=cluster.nproc_per_node, gpus_per_node=cluster.gpus_per_worker,
                      cpu=cluster.cpu, memory=cluster.memory, shm_size=cluster.shm_size,
                      secret=S3Secret(cluster.s3_secret, cluster.s3_endpoint), keep_job=cluster.keep_job,
                      timeout_s=cluster.timeout_s, runtime=cluster.runtime, elastic_min=cluster.elastic_min,
                      elastic_max=cluster.elastic_max)
    if launcher == "trainjob":
        from components.launchers.trainjob import check_options

        check_options(opts)
    return {**asdict(cluster), "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "job_image": image}


def build_pipeline(blocks: int = 3, image: str = DEFAULT_IMAGE, launcher: str = "local",
                   cluster: ClusterOptions | None = None, workers: int = 2):
    """Return the pipeline function for `blocks` blocks, its steps running in `image`. With
    launcher="pytorchjob" or "trainjob" each block is a PyTorchJob or a Trainer v2 TrainJob of
    `workers` pods (the parameter's default) set up by `cluster`, and the steps that touch S3 read
    its credentials from the Secret."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if launcher not in ("local", *CLUSTER_LAUNCHERS):
        raise ValueError(f"launcher {launcher!r}: expected 'local', 'pytorchjob' or 'trainjob'")
    cluster = (cluster or ClusterOptions()) if launcher in CLUSTER_LAUNCHERS else None
    job_args = _check_cluster(image, cluster, launcher, workers) if cluster else {}
    prepare_op = prepare_dataset.component(image)
    weights_op = class_weights.component(image)
    train_op = train_block.component(image)
    evaluate_op = evaluate.component(image)
    report_op = report.component(image)
    export_op = export_model.component(image)

    @dsl.pipeline(name=PIPELINE_NAME, description=f"YOLOv5 training in {blocks} blocks; each block's evaluation "
                  "(per-class mAP) weights the next block's images by class_weights * (1 - maps)^2.")
    def kfyolo_feedback(data: str, cfg: str = "yolov5n", weights: str = "", imgsz: int = 256,
                        batch_size: int = 16, epochs_per_block: int = 5, workers: int = workers,
                        image_weights: bool = True, sampler: str = DEFAULT_SAMPLER, rfs_t: float = 0.1,
                        cls_feedback: float = 0.0, val_every: int = 5, optimizer: str = "SGD", nbs: int = 64,
                        hyp_overrides: str = "", seed: int = 0,
                        device: str = "", eval_batch_size: int = 32, publish: str = "", study: str = ""):
        prepared = prepare_op(data=data).set_display_name("prepare dataset")
        if cluster:
            _use_s3(prepared, cluster)
        dataset = prepared.outputs["dataset"]
        cw = weights_op(dataset=dataset).set_display_name("class weights")
        model = evaluation = None
        for k in range(blocks):
            previous = {"checkpoint": model, "evaluation": evaluation} if k else {}
            train = train_op(dataset=dataset, class_weights=cw.outputs["weights"], block=k, blocks=blocks,
                             epochs_per_block=epochs_per_block, cfg=cfg, weights=weights, imgsz=imgsz,
                             batch_size=batch_size, workers=workers, image_weights=image_weights,
                             sampler=sampler, rfs_t=rfs_t, cls_feedback=cls_feedback, val_every=val_every,
                             optimizer=optimizer, nbs=nbs,
                             hyp_overrides=hyp_overrides, seed=seed, device=device, launcher=launcher,
                             **previous, **job_args).set_display_name(f"train block {k + 1}/{blocks}")
            model = train.outputs["model"]
            ev = evaluate_op(model=model, dataset=dataset, block=k, imgsz=imgsz, batch_size=eval_batch_size,
                             device=device).set_display_name(f"evaluate block {k + 1}/{blocks}")
            if cluster:
                _use_s3(train, cluster)
                if cluster.gpus_per_worker:
                    ev.set_accelerator_type(GPU).set_accelerator_limit(1)
            evaluation = ev.outputs["evaluation"]
        # The last block's model as ONNX for serving (beside its evaluation, which it does not need).
        exported = export_op(model=model, dataset=dataset, imgsz=imgsz).set_display_name("export ONNX")
        published = report_op(model=model, evaluation=evaluation, dataset=dataset, epochs_per_block=epochs_per_block,
                              publish=publish, study=study, exported_model=exported.outputs["onnx_model"],
                              exported_predictions=exported.outputs["predictions"]).set_display_name("report")
        if cluster:
            _use_s3(published, cluster)

    return kfyolo_feedback
