"""The ferpipe DAG: stages 1-4 per shard, then per fold augmentation, five trainings, prediction; then aggregation.

    start MLflow run (beside stages 1-4; the fold plan waits for it)
    fingerprint -> shard plan
      for each shard: input -> CLAHE -> detection -> landmarks (published under <work_uri>/shards/)
    gather shards (after every shard) -> fold plan
      for each fold:  augmentation -> train eyebrows, eyes, nose, mouth, jaw (GPU) -> prediction
    aggregation (after every fold) -> MLflow, Table I, confusion matrix, report.md and report.html
    if final_model: augmentation (all subjects) -> train the five again -> final model -> MLflow Model Registry

A pod's cost does not grow with the dataset: stages 1-4 are four tasks per
shard of about `shard_size` images (ferpipe.data.shards), each writing one pack
of pixels per shard rather than an object per image (ferpipe.data.packs); the
gather and the fold datasets reference the packs where they lie; training,
prediction and the final model stream them (ferpipe.model.stream).

Built for the KFP backends teams run, from Kubeflow 1.10's KFP 2.5 on
(`MIN_BACKEND`; tests/test_backend_compat.py checks the compiled IR against
the table of constructs and the release that first runs each):

- The five part trainings are unrolled at compile time: five named tasks per
  fold ("train eyebrows", ...), and prediction takes the five models as five
  inputs. A collected list out of a loop (`dsl.Collected`) runs only on 2.14
  and later (kubeflow/pipelines PR #11725).
- The aggregation depends on the whole fold loop (`.after(...)` compiles to
  `dependentTasks: [for-loop-N]`, run correctly from 2.4.1, PR #11627) and
  reads each fold's result from `<work_uri>/<KFP run id>/folds/`, where the
  prediction tasks leave them. Prediction is never answered from KFP's cache,
  so every run writes its own folds there; the members it reads still are.
- The gather depends on the whole shard loop the same way, but reads the
  shards from content-addressed places (ferpipe.preprocess.sharded), not from a
  prefix of the run: so it, the fold datasets and the trainings after it keep
  KFP's cache when no shard changed, and a shard task's only identity is its
  loop item (shard and offers key), so unchanged shards keep it when others
  change. No training task takes the run id (live MLflow reads it from the
  pod's label), which would make KFP's cache miss every time.
- Neither loop has a custom `name=`: on 2.14-2.15 a named loop breaks
  fan-in (issue #11964, fixed by #12808 in 2.16).
- The final model (`final_model`, on by default) starts after the aggregation, so it never runs before
  cross-validation has measured the method. It reuses the stage 5 and training components with the
  fold `ALL_SUBJECTS` (nobody held out, validation subjects drawn from everyone), as five more unrolled
  tasks with explicit inputs; the condition is a plain `dsl.If`, run by every v2 backend. A second
  `dsl.If` inside it (conditions have no `and`: nesting is KFP's way to write one) skips it under
  `selection` test-fold: a run whose optimistic figures the test fold chose trains and registers no model.
- Lineage stays where it can: every stage's output is an artifact the next
  task takes as input, the five models included.

Local-runner traps (DESIGN.md section 6) shape it too: each loop's body gets
its shard or fold through the loop item and artifacts, never an upstream
parameter output (which the local runner would replace by the item).
"""

from kfp import dsl, kubernetes

from components.aggregation_stage import aggregation
from components.augmentation_stage import augmentation_stage
from components.clahe_stage import clahe_stage
from components.detection_stage import detection_stage
from components.final_model_stage import final_model_stage
from components.fold_plan import fold_plan
from components.images import (
    GPU_NODE_LABEL,
    GPU_RESOURCE,
    GPU_TOLERATION,
    STORAGE_SECRET,
    STORAGE_SECRET_KEYS,
    TASK_ENVIRONMENT,
    TRACKING_SECRET,
    TRACKING_SECRET_KEYS,
)
from components.gather_stage import gather_shards
from components.input_stage import input_fingerprint, input_stage, shard_plan
from components.landmark_stage import landmark_stage
from components.prediction_stage import prediction_stage
from components.tracking_start import tracking_start
from components.training_stage import training_stage
from ferpipe.crossval.fold_dataset import ALL_SUBJECTS
from ferpipe.crossval.tracking import RUN_ID_VARIABLE
from ferpipe.data.datasets import DatasetOptions
from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.data.shards import DEFAULT_SHARD_SIZE
from ferpipe.model.profiles import VALIDATION
from ferpipe.preprocess.detection import DetectionSettings
from ferpipe.preprocess.imaging import ClaheSettings
from ferpipe.preprocess.landmarks import LandmarkSettings

PIPELINE_NAME = "ferpipe"
MIN_BACKEND = "2.5.0"  # the oldest KFP backend this DAG runs on; README and `ferpipe submit` say the same

# The KFP run's id (keys the shared fold results and the MLflow runs) and its name (recorded in MLflow; empty
# for a recurring run's runs, which the backend creates without a display name).
RUN_ID, RUN_NAME = dsl.PIPELINE_JOB_ID_PLACEHOLDER, dsl.PIPELINE_JOB_NAME_PLACEHOLDER
# Where a pod carries its run's id (apiserver/template/v2_template.go and the scheduled-workflow controller).
RUN_ID_POD_LABEL = "metadata.labels['pipeline/runid']"

CLAHE, DETECTION, LANDMARKS = ClaheSettings(), DetectionSettings(), LandmarkSettings()

# Training survives a lost GPU node: retried with backoff, it resumes from the checkpoint it mirrors to
# <cache_uri>/checkpoints/<member key>/ after every epoch (components/training_stage.py).
# KFP 2.5-2.13 apply retry policies to root-DAG tasks only (argocompiler/container.go at 2.5.0): the tasks in
# the fold loop and in the final-model condition, every training among them, get none there; 2.14 and later
# honour it in loops (pipelines/backend.py).
TRAINING_RETRIES = dict(num_retries=3, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="900s")
# Stages that only read inputs and rewrite their own output are safe to run again.
STAGE_RETRIES = dict(num_retries=2, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="300s")


def with_storage_secret(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Object-store credentials from the Kubernetes Secret, as environment variables; never parameters."""
    return kubernetes.use_secret_as_env(task, secret_name=STORAGE_SECRET,
                                        secret_key_to_env={key: TASK_ENVIRONMENT[key] for key in STORAGE_SECRET_KEYS})


def with_run_id_from_pod(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The KFP run id as an environment variable, read from the `pipeline/runid` label the backend puts on
    every pod of a run (scheduled runs too): live MLflow for a task that must not take the id as an input,
    since KFP's cache key holds every input value and would never reuse it."""
    return kubernetes.use_field_path_as_env(task, env_name=RUN_ID_VARIABLE, field_path=RUN_ID_POD_LABEL)


def logs_to_mlflow(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The pipeline's MLflow user from its Kubernetes Secret, for a task that logs: the server asks every
    request but /health for a user. Environment variables MLflow's client reads; never parameters."""
    return kubernetes.use_secret_as_env(task, secret_name=TRACKING_SECRET,
                                        secret_key_to_env={key: key for key in TRACKING_SECRET_KEYS})


def on_gpu_node(task: dsl.PipelineTask) -> dsl.PipelineTask:
    with_storage_secret(task)  # the member cache lives in the object store
    with_run_id_from_pod(task)
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request("4").set_memory_request("16G").set_memory_limit("32G")
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    return task.set_retry(**TRAINING_RETRIES)


def on_cpu_node(task: dsl.PipelineTask, cpu: str = "2", memory: str = "4G", retry: bool = True) -> dsl.PipelineTask:
    with_storage_secret(task)  # data and caches live in the object store (MLflow's artifacts go via its server)
    task.set_cpu_request(cpu).set_memory_request(memory)
    return task.set_retry(**STAGE_RETRIES) if retry else task


def gpu_schedule(max_parallel_gpu: int) -> tuple[int, int]:
    """(folds at a time, trainings at a time within a fold) for at most `max_parallel_gpu` GPU tasks at once.

    0 is no limit. A fold's five trainings start together, so N >= 5 runs N // 5
    folds at a time; N < 5 runs one fold at a time with its trainings in N chains.
    """
    if max_parallel_gpu < 0:
        raise ValueError("--max-parallel-gpu must be 0 (no limit) or a positive number of GPU tasks")
    if max_parallel_gpu == 0:
        return 0, len(ENSEMBLE_PARTS)
    if max_parallel_gpu >= len(ENSEMBLE_PARTS):
        return max_parallel_gpu // len(ENSEMBLE_PARTS), len(ENSEMBLE_PARTS)
    return 1, max_parallel_gpu


def build_pipeline(fold_parallelism: int = 0, trainings_per_fold: int = len(ENSEMBLE_PARTS),
                   shard_parallelism: int = 0):
    """The pipeline function; `fold_parallelism` folds train at once (0 = all, the cluster's default),
    and within a fold `trainings_per_fold` of the five trainings (the others wait in chains);
    `shard_parallelism` shards are preprocessed at once (0 = all).

    A local run on a laptop takes two folds at a time, so one training task
    imports TensorFlow while another trains, and one shard at a time, each stage
    task on every core. The limits are compiled into the YAML (`iteratorPolicy`,
    task dependencies), hence a factory rather than pipeline parameters;
    `ferpipe compile --max-parallel-gpu N` picks them.
    """

    @dsl.pipeline(name=PIPELINE_NAME, description="Part-based ensemble transfer learning for facial expression "
                  "recognition (Wadhawan & Gandhi): preprocessing, per-fold training of five part networks, MLflow.")
    def ferpipe_pipeline(
        data_uri: str = "s3://ferpipe/datasets/jaffe",
        dataset: str = "jaffe",
        network: str = "el",
        profile: str = "paper",
        seed: int = 0,
        n_folds: int = DatasetOptions().n_folds,
        max_folds: int = 0,
        mlflow_uri: str = "http://mlflow.ferpipe.svc.cluster.local:5000",
        experiment: str = "ferpipe",
        clahe_clip_limit: float = CLAHE.clip_limit,
        clahe_tile_grid: int = CLAHE.tile_grid,
        detection_confidence: float = DETECTION.confidence,
        on_no_face: str = DETECTION.on_no_face,
        landmark_source: str = LANDMARKS.source,
        cache_uri: str = "s3://ferpipe/cache",
        work_uri: str = "s3://ferpipe/work",
        subject_meta_uri: str = "",
        final_model: bool = True,
        shard_size: int = DEFAULT_SHARD_SIZE,
        selection: str = VALIDATION,
        expression: str = "",
    ) -> str:
        """Train and evaluate a FER ensemble on one dataset, with the dataset's own protocol.

        Args:
            data_uri: Where the raw images are: s3://bucket/prefix (credentials come from the ferpipe-storage Secret).
            dataset: The layout and protocol of the data: ckplus, jaffe, sfew, folder, split (<split>/<class>/<file>: train, val, test) or fer2013 (fer2013.csv).
            network: el (one network per facial part, the paper's), ftl (five networks pre-trained on all 68 points) or baseline (five randomly initialised).
            profile: smoke (seconds, tests), demo (minutes on a CPU) or paper (the paper's epochs; needs GPUs).
            seed: Seed for validation splits, augmentation and weights; the same seed repeats a run.
            n_folds: Folds for k-fold datasets (CK+, folder); JAFFE is leave-one-subject-out, SFEW train/val, split and fer2013 the dataset's own train/validation/test.
            max_folds: Train only the first N folds (0 = all), for quick checks.
            mlflow_uri: MLflow tracking server (it proxies artifacts: tasks need no S3 keys for it; they sign in as the user in the ferpipe-mlflow-tracking Secret); empty to skip MLflow.
            experiment: MLflow experiment name.
            clahe_clip_limit: CLAHE clip limit (the paper gives none; 2.0 is common).
            clahe_tile_grid: CLAHE tiles per side.
            detection_confidence: SSD confidence a face must reach.
            on_no_face: skip (record no_face) or dlib_hog (try dlib's HOG detector).
            landmark_source: dlib, or dataset (CK+'s own landmark files).
            cache_uri: Per-image preprocessing results, trained members and their checkpoints, keyed by content and settings, so a rerun redoes only what changed; empty to turn off.
            work_uri: Where a run's tasks share files: each fold's result for the aggregation, under <work_uri>/<KFP run id>/ (and training checkpoints when cache_uri is empty).
            subject_meta_uri: CSV of per-subject attributes (subject id, then e.g. age, gender) for accuracy per group of people; empty: the dataset's own (a folder dataset's subjects.csv), or none.
            shard_size: Images per shard, about: stages 1-4 run as four tasks per shard, all shards at once, each writing one pack of pixels per shard; an image's shard follows from its id alone, so new images touch few shards.
            final_model: After cross-validation, train the five members again on all usable subjects, export the single-graph ensemble as an MLflow pyfunc and register it as ferpipe-<dataset>-<network> (alias champion when its cross-validated accuracy is no worse).
            selection: How each member's checkpoint is chosen: validation (strict: validation subjects drawn from the training side) or test-fold (also reports, from the same trainings, what choosing by the loss on the fold's test subjects gives, as the authors' notebook did; labelled "optimistic: the test fold chose the checkpoint" everywhere, and such a run trains no final model and registers nothing).
            expression: The expression phase after landmark pre-training: fine-tune (the head, then everything: the paper's text), head-only (the head alone on the frozen extractor, the authors' notebook), or empty for the profile's own.
        """
        # The MLflow parent run exists before any task that nests a run in it (the fold plan waits for it);
        # never cached, since each KFP run has its own parent run. Needs the tracking URI and the pipeline's
        # MLflow user (and the data store, to tell synthetic data): the server proxies artifacts to S3.
        started = on_cpu_node(tracking_start(mlflow_uri=mlflow_uri, experiment=experiment, kfp_run_id=RUN_ID,
                                             kfp_run_name=RUN_NAME, dataset=dataset, network=network, profile=profile,
                                             data_uri=data_uri, seed=seed, selection=selection, expression=expression),
                              cpu="500m", memory="1G")
        logs_to_mlflow(started)
        started.set_display_name("start MLflow run").set_caching_options(False)
        fingerprint = on_cpu_node(input_fingerprint(data_uri=data_uri, cache_uri=cache_uri))
        fingerprint.set_caching_options(False)  # must look at the data every run; everything after is keyed on it
        shards = on_cpu_node(shard_plan(dataset=dataset, data_uri=data_uri, fingerprint=fingerprint.output,
                                        n_folds=n_folds, shard_size=shard_size, work_uri=work_uri,
                                        subject_meta_uri=subject_meta_uri))
        shards.set_display_name("shard plan")
        with dsl.ParallelFor(shards.outputs["Output"], parallelism=shard_parallelism) as shard:
            frames = on_cpu_node(input_stage(shard=shard, data_uri=data_uri, work_uri=work_uri, cache_uri=cache_uri))
            enhanced = on_cpu_node(clahe_stage(frames=frames.outputs["frames"], clip_limit=clahe_clip_limit,
                                               tile_grid=clahe_tile_grid, cache_uri=cache_uri))
            faces = on_cpu_node(detection_stage(enhanced=enhanced.outputs["enhanced"],
                                                confidence=detection_confidence, on_no_face=on_no_face,
                                                cache_uri=cache_uri))
            stage4 = on_cpu_node(landmark_stage(faces=faces.outputs["faces"], source=landmark_source,
                                                cache_uri=cache_uri, work_uri=work_uri))
        annotated = on_cpu_node(gather_shards(
            plan=shards.outputs["plan"], work_uri=work_uri, clahe_clip_limit=clahe_clip_limit,
            clahe_tile_grid=clahe_tile_grid, detection_confidence=detection_confidence, on_no_face=on_no_face,
            landmark_source=landmark_source)).after(stage4)
        annotated.set_display_name("gather shards")
        plan = on_cpu_node(fold_plan(annotated=annotated.outputs["annotated"], max_folds=max_folds)).after(started)

        with dsl.ParallelFor(plan.outputs["Output"], parallelism=fold_parallelism) as fold:
            augmented = on_cpu_node(augmentation_stage(annotated=annotated.outputs["annotated"], fold=fold,
                                                       profile=profile, dataset=dataset, seed=seed,
                                                       selection=selection, expression=expression))
            models, trainings = {}, []
            for part in ENSEMBLE_PARTS:
                trained = on_gpu_node(training_stage(fold_data=augmented.outputs["fold_data"], network=network,
                                                     slot=part, profile=profile, dataset=dataset, seed=seed,
                                                     cache_uri=cache_uri, work_uri=work_uri, mlflow_uri=mlflow_uri,
                                                     experiment=experiment))
                trained.set_display_name(f"train {part}")
                logs_to_mlflow(trained)  # each epoch, live
                if len(trainings) >= trainings_per_fold:  # a GPU budget: wait for the chain's previous task
                    trained.after(trainings[-trainings_per_fold])
                trainings.append(trained)
                models[part] = trained.outputs["model"]
            predicted = on_cpu_node(prediction_stage(fold_data=augmented.outputs["fold_data"], **models,
                                                     network=network, profile=profile, dataset=dataset, seed=seed,
                                                     work_uri=work_uri, kfp_run_id=RUN_ID, mlflow_uri=mlflow_uri,
                                                     experiment=experiment))
            predicted.set_caching_options(False)  # it must write this run's fold result under this run's id
            logs_to_mlflow(predicted)

        aggregated = on_cpu_node(aggregation(
            folds=plan.outputs["Output"], network=network, profile=profile, dataset=dataset, data_uri=data_uri,
            seed=seed, mlflow_uri=mlflow_uri, experiment=experiment, work_uri=work_uri,
            kfp_run_id=RUN_ID, kfp_run_name=RUN_NAME, fingerprint=fingerprint.output,
            annotated=annotated.outputs["annotated"], expression=expression), retry=False).after(predicted)
        aggregated.set_caching_options(False)  # a rerun must still log to MLflow (and is not retried: it logs once)
        logs_to_mlflow(aggregated)

        # `== True` on a pipeline parameter compiles to the condition; `if final_model` would test a Python object.
        with dsl.If(final_model == True, name="final model"):  # noqa: E712
            with dsl.If(selection == VALIDATION, name="strict selection"):
                everyone = on_cpu_node(augmentation_stage(annotated=annotated.outputs["annotated"], fold=ALL_SUBJECTS,
                                                          profile=profile, dataset=dataset, seed=seed,
                                                          expression=expression)).after(aggregated)
                everyone.set_display_name("augmentation, all subjects")
                final_members, final_trainings = {}, []
                for part in ENSEMBLE_PARTS:
                    trained = on_gpu_node(training_stage(fold_data=everyone.outputs["fold_data"], network=network,
                                                         slot=part, profile=profile, dataset=dataset, seed=seed,
                                                         cache_uri=cache_uri, work_uri=work_uri))
                    trained.set_display_name(f"final {part}")
                    if len(final_trainings) >= trainings_per_fold:  # the same GPU budget as a fold's trainings
                        trained.after(final_trainings[-trainings_per_fold])
                    final_trainings.append(trained)
                    final_members[part] = trained.outputs["model"]
                registered = on_cpu_node(final_model_stage(
                    fold_data=everyone.outputs["fold_data"], **final_members, reports=aggregated.outputs["reports"],
                    mlflow_run_id=aggregated.outputs["Output"], fingerprint=fingerprint.output, network=network,
                    profile=profile, dataset=dataset, seed=seed, clahe_clip_limit=clahe_clip_limit,
                    clahe_tile_grid=clahe_tile_grid, detection_confidence=detection_confidence, on_no_face=on_no_face,
                    mlflow_uri=mlflow_uri, experiment=experiment, kfp_run_id=RUN_ID), retry=False)
                registered.set_display_name("final model")
                logs_to_mlflow(registered)  # registers the version and moves `champion`
                registered.set_caching_options(False)  # every run registers its own version; not retried: once
        return aggregated.outputs["Output"]

    return ferpipe_pipeline


# What `ferpipe compile` writes and the Kubeflow UI runs: every fold and part at once.
ferpipe_pipeline = build_pipeline()
