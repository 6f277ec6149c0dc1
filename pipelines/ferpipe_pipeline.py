"""The ferpipe DAG: stages 1-4 once, then per fold augmentation, five trainings, prediction; then aggregation.

    fingerprint -> input -> CLAHE -> detection -> landmarks -> fold plan
      for each fold:            augment -> for each part: train (GPU) -> predict (collects the five)
    aggregate (collects every fold) -> MLflow, Table I, confusion matrix, report

Local-runner traps (DESIGN.md section 6) shape it: the inner loop receives its
fold through the augmentation *artifact*, never the outer loop's item (which
the local runner would replace with the inner item).
"""

from kfp import dsl, kubernetes

from components.aggregation_stage import aggregate_results
from components.augmentation_stage import augment_fold
from components.clahe_stage import enhance_contrast
from components.detection_stage import detect_faces
from components.fold_plan import plan_folds
from components.images import GPU_NODE_LABEL, GPU_RESOURCE, GPU_TOLERATION, STORAGE_SECRET, STORAGE_SECRET_KEYS
from components.input_stage import fingerprint_data, read_input
from components.landmark_stage import annotate_landmarks
from components.prediction_stage import predict_fold
from components.training_stage import train_member
from ferpipe.data.parts import ENSEMBLE_PARTS

PIPELINE_NAME = "ferpipe"


def with_storage_secret(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MinIO/MLflow credentials from the Kubernetes Secret, as environment variables; never parameters."""
    return kubernetes.use_secret_as_env(task, secret_name=STORAGE_SECRET,
                                        secret_key_to_env={key: key for key in STORAGE_SECRET_KEYS})


def on_gpu_node(task: dsl.PipelineTask) -> dsl.PipelineTask:
    with_storage_secret(task)  # the member cache lives in the object store
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request("4").set_memory_request("16G").set_memory_limit("32G")
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    return task


def on_cpu_node(task: dsl.PipelineTask, cpu: str = "2", memory: str = "4G") -> dsl.PipelineTask:
    with_storage_secret(task)  # data, cache and MLflow artifacts live in the object store
    return task.set_cpu_request(cpu).set_memory_request(memory)


def build_pipeline(fold_parallelism: int = 0, part_parallelism: int = 0):
    """The pipeline function; parallelism 0 = unlimited (the cluster), 1 = one at a time.

    Local runs on a laptop limit both: five TensorFlow processes at once on two
    cores would only fight over them. The loops' limits are compiled into the
    YAML, hence a factory rather than pipeline parameters.
    """

    @dsl.pipeline(name=PIPELINE_NAME, description="Part-based ensemble transfer learning for facial expression "
                  "recognition (Wadhawan & Gandhi): preprocessing, per-fold training of five part networks, MLflow.")
    def ferpipe_pipeline(
        data_uri: str = "s3://ferpipe/datasets/jaffe",
        dataset: str = "jaffe",
        network: str = "el",
        profile: str = "paper",
        seed: int = 0,
        n_folds: int = 10,
        max_folds: int = 0,
        mlflow_uri: str = "http://mlflow.ferpipe.svc.cluster.local:5000",
        experiment: str = "ferpipe",
        clahe_clip_limit: float = 2.0,
        clahe_tile_grid: int = 8,
        detection_confidence: float = 0.5,
        on_no_face: str = "skip",
        landmark_source: str = "dlib",
        cache_uri: str = "s3://ferpipe/cache",
    ) -> str:
        """Train and evaluate a FER ensemble on one dataset, with the dataset's own protocol.

        Args:
            data_uri: Where the raw images are: s3://bucket/prefix (credentials come from the ferpipe-storage Secret).
            dataset: The layout and protocol of the data: ckplus, jaffe, sfew or folder.
            network: el (one network per facial part, the paper's), ftl (five networks pre-trained on all 68 points) or baseline (five randomly initialised).
            profile: smoke (seconds, tests), demo (minutes on a CPU) or paper (the paper's epochs; needs GPUs).
            seed: Seed for validation splits, augmentation and weights; the same seed repeats a run.
            n_folds: Folds for k-fold datasets (CK+, folder); JAFFE is leave-one-subject-out, SFEW train/val.
            max_folds: Train only the first N folds (0 = all), for quick checks.
            mlflow_uri: MLflow tracking server; empty to skip MLflow.
            experiment: MLflow experiment name.
            clahe_clip_limit: CLAHE clip limit (the paper gives none; 2.0 is common).
            clahe_tile_grid: CLAHE tiles per side.
            detection_confidence: SSD confidence a face must reach.
            on_no_face: skip (record no_face) or dlib_hog (try dlib's HOG detector).
            landmark_source: dlib, or dataset (CK+'s own landmark files).
            cache_uri: Per-image preprocessing results and trained members, keyed by content and settings, so a rerun redoes only what changed; empty to turn off.
        """
        fingerprint = on_cpu_node(fingerprint_data(data_uri=data_uri))
        fingerprint.set_caching_options(False)  # must look at the data every run; everything after is keyed on it
        frames = on_cpu_node(read_input(dataset=dataset, data_uri=data_uri, fingerprint=fingerprint.output,
                                        n_folds=n_folds, cache_uri=cache_uri))
        enhanced = on_cpu_node(enhance_contrast(frames=frames.outputs["frames"], clip_limit=clahe_clip_limit,
                                                tile_grid=clahe_tile_grid, cache_uri=cache_uri))
        faces = on_cpu_node(detect_faces(enhanced=enhanced.outputs["enhanced"], confidence=detection_confidence,
                                         on_no_face=on_no_face, cache_uri=cache_uri))
        annotated = on_cpu_node(annotate_landmarks(faces=faces.outputs["faces"], source=landmark_source,
                                                   cache_uri=cache_uri))
        plan = on_cpu_node(plan_folds(annotated=annotated.outputs["annotated"], max_folds=max_folds))

        with dsl.ParallelFor(plan.outputs["Output"], parallelism=fold_parallelism, name="fold") as fold:
            augmented = on_cpu_node(augment_fold(annotated=annotated.outputs["annotated"], fold=fold, profile=profile,
                                                 dataset=dataset, seed=seed))
            with dsl.ParallelFor(list(ENSEMBLE_PARTS), parallelism=part_parallelism, name="part") as slot:
                trained = on_gpu_node(train_member(fold_data=augmented.outputs["fold_data"], network=network,
                                                   slot=slot, profile=profile, dataset=dataset, seed=seed,
                                                   cache_uri=cache_uri))
            predicted = on_cpu_node(predict_fold(fold_data=augmented.outputs["fold_data"],
                                                 models=dsl.Collected(trained.outputs["model"]), network=network,
                                                 profile=profile, dataset=dataset, seed=seed))

        aggregated = on_cpu_node(aggregate_results(
            predictions=dsl.Collected(predicted.outputs["predictions"]), network=network, profile=profile,
            dataset=dataset, data_uri=data_uri, seed=seed, mlflow_uri=mlflow_uri, experiment=experiment,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
        aggregated.set_caching_options(False)  # a rerun must still log to MLflow
        return aggregated.outputs["Output"]

    return ferpipe_pipeline


# What `ferpipe compile` writes and the Kubeflow UI runs: every fold and part at once.
ferpipe_pipeline = build_pipeline()
