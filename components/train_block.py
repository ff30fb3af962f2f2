"""train_block: train epochs [k*E, (k+1)*E) of a K*E-epoch schedule, resuming the previous block."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output


def train_block(dataset: Input[Dataset], class_weights: Input[Artifact], block: int, blocks: int,
                epochs_per_block: int, cfg: str, weights: str, imgsz: int, batch_size: int, workers: int,
                image_weights: bool, hyp_overrides: str, seed: int, device: str, launcher: str,
                model: Output[Model], sampler: str = "", rfs_t: float = 0.1, cls_feedback: float = 0.0,
                val_every: int = 0, optimizer: str = "SGD", nbs: int = 64, checkpoint: Input[Model] = None, evaluation: Input[Artifact] = None,
                run_id: str = "", namespace: str = "", job_image: str = "", nproc_per_node: int = 1,
                gpus_per_worker: int = 0, cpu: str = "4", memory: str = "16Gi", shm_size: str = "2Gi",
                s3_prefix: str = "", s3_secret: str = "kfyolo-s3", s3_endpoint: str = "", keep_job: bool = False,
                timeout_s: int = 86400, runtime: str = "torch-distributed", elastic_min: int = 0,
                elastic_max: int = 0) -> None:
    """Train one block and leave its run folder (weights/last.pt, results, TensorBoard logs,
    weighting records) in `model`. Block 0 starts from `weights` (or scratch); block k > 0 resumes
    `checkpoint` and weights its images by `evaluation`'s maps. `sampler` (or the classic one for
    `image_weights`) draws each epoch's images; `val_every` > 0 validates inside the block every so
    many epochs, so the maps that steer the sampler and `cls_feedback` follow the model.

    launcher="local": `workers` torchrun processes in this step. launcher="pytorchjob": a PyTorchJob
    of `workers` pods (1 Master + workers-1 Workers; elastic between `elastic_min` and `elastic_max`
    pods when those are set); launcher="trainjob": a Kubeflow Trainer v2 TrainJob of `workers` nodes
    on the ClusterTrainingRuntime `runtime`. Each pod runs `gpus_per_worker` processes (or
    `nproc_per_node` without GPUs); the job is named after `run_id` and the block; data and
    checkpoints go through S3 under `s3_prefix`, credentials from the Secret `s3_secret` (see
    components/launchers/clusterjob.py for the other parameters)."""
    import json
    from pathlib import Path

    from components.launchers import TrainRequest, parse_hyp_overrides, seed_block_folder

    if launcher not in ("local", "pytorchjob", "trainjob"):
        raise ValueError(f"launcher {launcher!r}: expected one of ('local', 'pytorchjob', 'trainjob')")
    job = None
    if launcher != "local":
        from components.launchers.cluster import S3Secret
        from components.launchers.clusterjob import JobOptions

        job = JobOptions(run_id=run_id, image=job_image, s3_prefix=s3_prefix, namespace=namespace, nodes=workers,
                         nproc_per_node=nproc_per_node, gpus_per_node=gpus_per_worker, cpu=cpu, memory=memory,
                         shm_size=shm_size, secret=S3Secret(s3_secret, s3_endpoint), keep_job=keep_job,
                         timeout_s=timeout_s, runtime=runtime, elastic_min=elastic_min, elastic_max=elastic_max)
    world_size = job.world_size if job is not None else workers
    if block > 0 and (checkpoint is None or evaluation is None):
        raise ValueError(f"block {block} needs the previous block's checkpoint and evaluation")
    run_dir = Path(model.path)
    seed_block_folder(run_dir, Path(checkpoint.path) if checkpoint is not None else None,
                      Path(evaluation.path) if evaluation is not None else None, block)
    request = TrainRequest(
        run_dir=run_dir, data_yaml=str(Path(dataset.path) / "data.yaml"), block=block, blocks=blocks,
        epochs_per_block=epochs_per_block, cfg=cfg, weights=weights, imgsz=imgsz, batch_size=batch_size,
        world_size=world_size, image_weights=image_weights, sampler=sampler, rfs_t=rfs_t, cls_feedback=cls_feedback,
        val_every=val_every, optimizer=optimizer, nbs=nbs, hyp_overrides=parse_hyp_overrides(hyp_overrides),
        seed=seed, class_weights=class_weights.path, device=device,
        maps=str(Path(evaluation.path) / "maps.json") if evaluation is not None else "")
    if job is None:
        from components.launchers.local import run_local

        run_local(request)
    else:
        if launcher == "pytorchjob":
            from components.launchers.pytorchjob import run_pytorchjob as run_job
        else:
            from components.launchers.trainjob import run_trainjob as run_job

        plan = run_job(request, job, dataset_dir=Path(dataset.path))
        model.metadata.update({launcher: plan.name, "run_uri": plan.run_uri})
    weighting = run_dir / "image_weights.jsonl"
    records = weighting.read_text().splitlines() if weighting.is_file() else []
    last = json.loads(records[-1]) if records else {}
    model.metadata.update({"block": block, "epochs": f"{block * epochs_per_block}-{request.stop_epoch - 1}",
                           "world_size": world_size, "launcher": launcher,
                           "sampler": last.get("sampler", sampler or ("classic" if image_weights else "uniform"))})
    if last:
        draws = dict(zip(last["names"], last["class_draws"]))
        model.metadata["class_draws_last_epoch"] = draws
        # The most favoured classes first, at most 12 (COCO has 80; all are in the metadata). Only
        # classes with training labels: one without any has the top weight and is never drawn.
        labelled = [t for t in zip(last["names"], last["class_weights"], last["class_draws"],
                                   last.get("class_labels", last["class_draws"])) if t[3] > 0]
        favoured = sorted(labelled, key=lambda t: -t[1])
        shown = ", ".join(f"{n} {d}" for n, _, d, _ in favoured[:12])
        more = f", ... {len(favoured) - 12} more" if len(favoured) > 12 else ""
        empty = len(last["names"]) - len(labelled)
        more += f" ({empty} classes without training labels left out)" if empty else ""
        print(f"[kfyolo] block {block}: trained epochs {block * epochs_per_block}-{request.stop_epoch - 1} "
              f"on {world_size} process(es), sampler {last.get('sampler', '?')}; labels drawn in the last epoch, heaviest class first: {shown}{more}")
    else:
        print(f"[kfyolo] block {block}: trained epochs {block * epochs_per_block}-{request.stop_epoch - 1}")


def component(image: str):
    return dsl.component(train_block, base_image=image, install_kfp_package=False)
