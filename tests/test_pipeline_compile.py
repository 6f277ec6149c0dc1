"""The compiled pipeline, as the Kubeflow UI receives it."""

from pathlib import Path

import pytest
import yaml

from pipelines.remote import COMPILED, compile_pipeline

STAGES = ("read-input", "enhance-contrast", "detect-faces", "annotate-landmarks", "augment-fold", "train-member",
          "predict-fold")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("yaml") / "ferpipe.yaml")


@pytest.fixture(scope="module")
def spec(compiled):
    ir, platform = yaml.safe_load_all(compiled.read_text())
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_yaml_is_current(compiled):
    assert COMPILED.read_text() == compiled.read_text(), "pipelines/ferpipe.yaml is stale: run `make compile`"


def test_the_seven_stages_and_the_steps_around_them(spec):
    ir, _ = spec
    components = set(ir["components"])
    for stage in (*STAGES, "fingerprint-data", "plan-folds", "aggregate-results"):
        assert f"comp-{stage}" in components


def test_a_fold_loop_holds_a_five_way_part_loop(spec):
    ir, _ = spec
    loops = {k: v for k, v in ir["root"]["dag"]["tasks"].items() if "parameterIterator" in v}
    assert len(loops) == 1
    (fold_loop,) = loops.values()
    assert fold_loop["parameterIterator"]["items"]["inputParameter"].endswith("plan-folds-Output")
    body = ir["components"][fold_loop["componentRef"]["name"]]["dag"]["tasks"]
    assert {"augment-fold", "predict-fold"} <= set(body)
    inner = [v for v in body.values() if "parameterIterator" in v]
    assert len(inner) == 1
    raw = yaml.safe_load(inner[0]["parameterIterator"]["items"]["raw"])
    assert raw == ["eyebrows", "eyes", "nose", "mouth", "jaw"]
    part_tasks = ir["components"][inner[0]["componentRef"]["name"]]["dag"]["tasks"]
    assert list(part_tasks) == ["train-member"]


def test_gpu_only_for_training(spec):
    ir, platform = spec
    for name, executor in ir["deploymentSpec"]["executors"].items():
        resources = executor["container"].get("resources", {})
        is_training = name == "exec-train-member"
        assert ("accelerator" in resources) == is_training, name
        assert ("nodeSelector" in platform.get(name, {})) == is_training, name
        assert ("tolerations" in platform.get(name, {})) == is_training, name
        image = executor["container"]["image"]
        assert image.endswith("ferpipe-gpu:0.1.0" if is_training else "ferpipe-cpu:0.1.0"), name
    train = ir["deploymentSpec"]["executors"]["exec-train-member"]["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu" and train["accelerator"]["resourceCount"] == "1"
    assert platform["exec-train-member"]["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]


def test_credentials_come_from_the_secret_and_never_appear(spec, compiled):
    ir, platform = spec
    for name, config in platform.items():
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == "ferpipe-storage"
        assert {e["envVar"] for e in secret["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    parameters = ir["root"]["inputDefinitions"]["parameters"]
    assert not {p for p in parameters if any(w in p.lower() for w in ("secret", "password", "key"))}
    # The key's name appears only where the Secret is mapped to the environment, never with a value.
    mentions = [line.strip() for line in compiled.read_text().splitlines() if "AWS_SECRET_ACCESS_KEY" in line]
    assert mentions and set(mentions) <= {"- envVar: AWS_SECRET_ACCESS_KEY", "secretKey: AWS_SECRET_ACCESS_KEY"}


def test_every_parameter_is_described_for_the_ui(spec):
    ir, _ = spec
    parameters = ir["root"]["inputDefinitions"]["parameters"]
    assert {"data_uri", "dataset", "network", "profile", "seed", "mlflow_uri"} <= set(parameters)
    for name, parameter in parameters.items():
        assert len(parameter.get("description", "")) > 10, name


def test_fingerprint_and_aggregation_are_never_cached(spec):
    ir, _ = spec
    tasks = ir["root"]["dag"]["tasks"]
    assert tasks["fingerprint-data"]["cachingOptions"] == {}
    assert tasks["aggregate-results"]["cachingOptions"] == {}
    assert tasks["read-input"]["cachingOptions"]["enableCache"] is True
    assert "fingerprint" in tasks["read-input"]["inputs"]["parameters"]
