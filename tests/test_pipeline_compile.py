"""The compiled pipeline, as the Kubeflow UI receives it."""

from pathlib import Path

import pytest
import yaml

from ferpipe.data.parts import ENSEMBLE_PARTS
from pipelines.diagram import mermaid, readme_with_diagram
from pipelines.remote import COMPILED, compile_pipeline

REPO = Path(__file__).resolve().parents[1]

STAGES = ("input-stage", "clahe-stage", "detection-stage", "landmark-stage", "augmentation-stage", "training-stage",
          "prediction-stage")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("yaml") / "ferpipe.yaml")


@pytest.fixture(scope="module")
def spec(compiled):
    ir, platform = yaml.safe_load_all(compiled.read_text())
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_yaml_is_current(compiled):
    assert COMPILED.read_text() == compiled.read_text(), "pipelines/ferpipe.yaml is stale: run `make compile`"


def test_the_readme_picture_is_the_compiled_dag():
    readme = (REPO / "README.md").read_text()
    assert readme_with_diagram(readme, COMPILED) == readme, "README's DAG picture is stale: run `make compile`"
    picture = mermaid(COMPILED)
    for name in ("input stage", "clahe stage", "detection stage", "landmark stage", "augmentation stage",
                 "train eyebrows (GPU)", "prediction stage", "aggregation"):
        assert f'["{name}"]' in picture, name
    assert "for_loop_1 --> gather_shards" in picture and "for_loop_2 --> aggregation" in picture  # the fan-ins
    assert 'for_loop_1["for each shard"]' in picture and 'for_loop_2["for each fold"]' in picture


def test_the_yaml_names_the_images_the_current_code_builds(spec):
    from components.images import CPU_IMAGE, GPU_IMAGE

    ir, _ = spec
    named = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert named == {CPU_IMAGE, GPU_IMAGE}, "stale image tags: run `make compile`"


def test_the_seven_stages_and_the_steps_around_them(spec):
    ir, _ = spec
    components = set(ir["components"])
    for stage in (*STAGES, "input-fingerprint", "shard-plan", "gather-shards", "fold-plan", "aggregation"):
        assert f"comp-{stage}" in components


def loop_over(ir: dict, producer: str) -> tuple[str, dict]:
    (found,) = [(k, v) for k, v in ir["root"]["dag"]["tasks"].items()
                if v.get("parameterIterator", {}).get("items", {}).get("inputParameter", "").endswith(f"{producer}-Output")]
    return found


def test_stages_1_to_4_run_per_shard_and_the_gather_waits_for_every_shard(spec):
    ir, _ = spec
    tasks = ir["root"]["dag"]["tasks"]
    key, loop = loop_over(ir, "shard-plan")
    body = ir["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"input-stage", "clahe-stage", "detection-stage", "landmark-stage"}  # four separate tasks
    assert body["input-stage"]["inputs"]["parameters"]["shard"]["componentInputParameter"].endswith("loop-item")
    for stage, previous in (("clahe-stage", "input-stage"), ("detection-stage", "clahe-stage"),
                            ("landmark-stage", "detection-stage")):
        (artifact,) = body[stage]["inputs"]["artifacts"].values()
        assert artifact["taskOutputArtifact"]["producerTask"] == previous
    gather = tasks["gather-shards"]
    assert key in gather["dependentTasks"]  # after the whole loop: no collected list (KFP 2.5)
    assert gather["inputs"]["artifacts"]["plan"]["taskOutputArtifact"]["producerTask"] == "shard-plan"
    assert "kfp_run_id" not in ir["components"]["comp-gather-shards"]["inputDefinitions"]["parameters"]
    assert tasks["fold-plan"]["inputs"]["artifacts"]["annotated"]["taskOutputArtifact"]["producerTask"] == \
        "gather-shards"
    assert ir["root"]["inputDefinitions"]["parameters"]["shard_size"]["defaultValue"] == 2000


def test_a_fold_loop_holds_five_named_trainings_feeding_one_prediction(spec):
    ir, _ = spec
    loops = {k: v for k, v in ir["root"]["dag"]["tasks"].items() if "parameterIterator" in v}
    assert len(loops) == 2  # shards, then folds
    _, fold_loop = loop_over(ir, "fold-plan")
    body = ir["components"][fold_loop["componentRef"]["name"]]["dag"]["tasks"]
    assert not [v for v in body.values() if "parameterIterator" in v]  # the parts are unrolled, not a loop
    trainings = {key: task["taskInfo"]["name"] for key, task in body.items() if key.startswith("training-stage")}
    assert sorted(trainings.values()) == sorted(f"train {part}" for part in ENSEMBLE_PARTS)
    predict = body["prediction-stage"]
    models = predict["inputs"]["artifacts"]
    assert set(models) == {"fold_data", *ENSEMBLE_PARTS}
    for part in ENSEMBLE_PARTS:  # each named input is the model of that part's training task
        producer = models[part]["taskOutputArtifact"]["producerTask"]
        assert trainings[producer] == f"train {part}"
    assert set(trainings) <= set(predict["dependentTasks"])


def test_aggregation_waits_for_the_whole_fold_loop(spec):
    ir, _ = spec
    tasks = ir["root"]["dag"]["tasks"]
    loop, _ = loop_over(ir, "fold-plan")
    assert loop in tasks["aggregation"]["dependentTasks"]
    # It lists the run's folds in work_uri; its one artifact input is stage 4's gathered dataset, from outside
    # the loop (the report's data quality).
    artifacts = tasks["aggregation"].get("inputs", {}).get("artifacts", {})
    assert {k: v["taskOutputArtifact"]["producerTask"] for k, v in artifacts.items()} == {"annotated": "gather-shards"}


def test_the_run_page_shows_the_preview_confusion_metrics_and_the_report(spec):
    """What the KFP UI renders inline from a task's outputs, by artifact type (no download needed)."""
    ir, _ = spec
    kinds = lambda component: {name: a["artifactType"]["schemaTitle"]  # noqa: E731
                               for name, a in ir["components"][component]["outputDefinitions"]["artifacts"].items()}
    assert kinds("comp-landmark-stage")["preview"] == "system.HTML"  # each shard's faces
    assert kinds("comp-gather-shards")["preview"] == "system.HTML"  # the dataset's
    aggregation = kinds("comp-aggregation")
    assert aggregation["report_html"] == "system.HTML" and aggregation["report"] == "system.Markdown"
    assert aggregation["confusion"] == "system.ClassificationMetrics" and aggregation["metrics"] == "system.Metrics"
    assert kinds("comp-prediction-stage")["metrics"] == "system.Metrics"
    tasks = ir["root"]["dag"]["tasks"]
    assert tasks["aggregation"]["inputs"]["parameters"]["fingerprint"]["taskOutputParameter"]["producerTask"] == \
        "input-fingerprint"
    assert tasks["shard-plan"]["inputs"]["parameters"]["subject_meta_uri"]["componentInputParameter"] == \
        "subject_meta_uri"


def test_gpu_only_for_training(spec):
    ir, platform = spec
    for name, executor in ir["deploymentSpec"]["executors"].items():
        resources = executor["container"].get("resources", {})
        is_training = name.startswith("exec-training-stage")
        assert ("accelerator" in resources) == is_training, name
        assert ("nodeSelector" in platform.get(name, {})) == is_training, name
        assert ("tolerations" in platform.get(name, {})) == is_training, name
        image = executor["container"]["image"]
        assert ("/ferpipe-gpu:" if is_training else "/ferpipe-cpu:") in image, name
    train = ir["deploymentSpec"]["executors"]["exec-training-stage"]["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu" and train["accelerator"]["resourceCount"] == "1"
    assert platform["exec-training-stage"]["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]


def test_credentials_come_from_the_secret_and_never_appear(spec, compiled):
    ir, platform = spec
    for name, config in platform.items():
        (secret,) = [s for s in config["secretAsEnv"] if s["secretName"] == "ferpipe-storage"]
        # Besides it, at most the pipeline's MLflow user (tests/test_backend_compat.py says which tasks).
        assert {s["secretName"] for s in config["secretAsEnv"]} <= {"ferpipe-storage", "ferpipe-mlflow-tracking"}
        names = {e["secretKey"]: e["envVar"] for e in secret["keyToEnv"]}
        assert names["AWS_ACCESS_KEY_ID"] == "FERPIPE_S3_ACCESS_KEY_ID", name
        assert names["AWS_SECRET_ACCESS_KEY"] == "FERPIPE_S3_SECRET_ACCESS_KEY", name
        # No AWS_* in a task's environment: KFP's launcher, in the same container, could take them as its own.
        assert not [v for v in names.values() if v.startswith("AWS_")], name
    parameters = ir["root"]["inputDefinitions"]["parameters"]
    assert not {p for p in parameters if any(w in p.lower() for w in ("secret", "password", "key"))}
    # The key's name appears only where the Secret is mapped to the environment, never with a value.
    mentions = [line.strip() for line in compiled.read_text().splitlines() if "SECRET_ACCESS_KEY" in line]
    assert mentions and set(mentions) <= {"- envVar: FERPIPE_S3_SECRET_ACCESS_KEY", "secretKey: AWS_SECRET_ACCESS_KEY"}


def test_every_parameter_is_described_for_the_ui(spec):
    ir, _ = spec
    parameters = ir["root"]["inputDefinitions"]["parameters"]
    assert {"data_uri", "dataset", "network", "profile", "seed", "mlflow_uri"} <= set(parameters)
    for name, parameter in parameters.items():
        assert len(parameter.get("description", "")) > 10, name


def test_fingerprint_prediction_and_aggregation_are_never_cached(spec):
    ir, _ = spec
    tasks = ir["root"]["dag"]["tasks"]
    assert tasks["input-fingerprint"]["cachingOptions"] == {}
    assert tasks["aggregation"]["cachingOptions"] == {}
    assert tasks["shard-plan"]["cachingOptions"]["enableCache"] is True
    assert tasks["gather-shards"]["cachingOptions"]["enableCache"] is True
    assert "fingerprint" in tasks["shard-plan"]["inputs"]["parameters"]
    shards = ir["components"][loop_over(ir, "shard-plan")[1]["componentRef"]["name"]]["dag"]["tasks"]
    assert all(task["cachingOptions"]["enableCache"] is True for task in shards.values())
    body = ir["components"][loop_over(ir, "fold-plan")[1]["componentRef"]["name"]]["dag"]["tasks"]
    assert body["prediction-stage"]["cachingOptions"] == {}  # each run writes its folds under its own id


def test_training_is_retried_with_backoff_and_aggregation_is_not(spec):
    ir, _ = spec
    tasks = ir["root"]["dag"]["tasks"]
    body = ir["components"][loop_over(ir, "fold-plan")[1]["componentRef"]["name"]]["dag"]["tasks"]
    retry = body["training-stage"]["retryPolicy"]
    assert retry["maxRetryCount"] >= 2 and retry["backoffFactor"] >= 2 and retry["backoffDuration"].endswith("s")
    assert "retryPolicy" in tasks["shard-plan"]
    assert "retryPolicy" not in tasks["aggregation"]  # it logs to MLflow once


@pytest.mark.parametrize("limit,folds_at_once,chained", [(0, None, False), (10, 2, False), (2, 1, True)])
def test_a_gpu_budget_limits_folds_and_chains_trainings(tmp_path, limit, folds_at_once, chained):
    ir, _ = yaml.safe_load_all(compile_pipeline(tmp_path / "limited.yaml", max_parallel_gpu=limit).read_text())
    _, loop = loop_over(ir, "fold-plan")
    assert loop.get("iteratorPolicy", {}).get("parallelismLimit") == folds_at_once
    body = ir["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    waits = {k: [d for d in t["dependentTasks"] if d.startswith("training-stage")]
             for k, t in body.items() if k.startswith("training-stage")}
    if chained:  # two chains: the third training waits for the first, the fifth for the third
        assert waits["training-stage-3"] == ["training-stage"] and waits["training-stage-5"] == ["training-stage-3"]
        assert waits["training-stage"] == [] and waits["training-stage-2"] == []
    else:
        assert not any(waits.values())


def test_the_final_model_waits_for_the_aggregation_and_takes_five_named_members(spec):
    """final_model: a condition after the aggregation, and inside it one on strict selection (a test-fold run
    trains and registers no model); five unrolled trainings on fold ALL_SUBJECTS, explicit inputs."""
    from ferpipe.crossval.fold_dataset import ALL_SUBJECTS

    ir, _ = spec
    tasks = ir["root"]["dag"]["tasks"]
    (branch,) = [k for k, v in tasks.items() if "triggerPolicy" in v]
    assert "final_model" in tasks[branch]["triggerPolicy"]["condition"]
    assert "aggregation" in tasks[branch]["dependentTasks"]
    assert ir["root"]["inputDefinitions"]["parameters"]["final_model"]["defaultValue"] is True
    assert ir["root"]["inputDefinitions"]["parameters"]["selection"]["defaultValue"] == "validation"
    outer = ir["components"][tasks[branch]["componentRef"]["name"]]["dag"]["tasks"]
    (strict,) = outer.values()  # the branch holds nothing but the second condition
    assert strict["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--selection'] == 'validation'"
    body = ir["components"][strict["componentRef"]["name"]]["dag"]["tasks"]
    (augment,) = [k for k in body if k.startswith("augmentation-stage")]
    assert "selection" not in body[augment]["inputs"]["parameters"]  # the final model is always strict
    assert body[augment]["inputs"]["parameters"]["fold"]["runtimeValue"]["constant"] == ALL_SUBJECTS
    trainings = {key: task["taskInfo"]["name"] for key, task in body.items() if key.startswith("training-stage")}
    assert sorted(trainings.values()) == sorted(f"final {part}" for part in ENSEMBLE_PARTS)
    final = body["final-model-stage"]
    for part in ENSEMBLE_PARTS:
        assert trainings[final["inputs"]["artifacts"][part]["taskOutputArtifact"]["producerTask"]] == f"final {part}"
    assert final["inputs"]["artifacts"]["reports"]["componentInputArtifact"]  # the aggregation's, into the branch
    assert final["cachingOptions"] == {} or not final["cachingOptions"].get("enableCache")


def test_training_takes_nothing_that_changes_from_run_to_run(spec):
    """KFP's cache key is every input value: a training task given the run id would never be reused. It reads
    the run from its pod's label instead (for live MLflow), which no cache key sees."""
    from ferpipe.crossval.tracking import RUN_ID_VARIABLE
    from pipelines.ferpipe_pipeline import RUN_ID, RUN_NAME, RUN_ID_POD_LABEL

    ir, platform = spec
    trainings = [t for c in ir["components"].values() for k, t in c.get("dag", {}).get("tasks", {}).items()
                 if k.startswith("training-stage")]
    assert len(trainings) == 2 * len(ENSEMBLE_PARTS)  # the fold loop's and the final model's
    for task in trainings:
        values = [v.get("runtimeValue", {}).get("constant") for v in task["inputs"]["parameters"].values()]
        assert not {RUN_ID, RUN_NAME} & set(map(str, values)), values
        assert task["cachingOptions"].get("enableCache") is True
    assert "kfp_run_id" not in ir["components"]["comp-training-stage"]["inputDefinitions"]["parameters"]
    assert platform["exec-training-stage"]["fieldPathAsEnv"] == [{"name": RUN_ID_VARIABLE,
                                                                 "fieldPath": RUN_ID_POD_LABEL}]
