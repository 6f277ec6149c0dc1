"""Each KFP component: called as a plain function (unit), and run by KFP's local runner.

The components hold no logic; these tests check that each one wires its typed
inputs and outputs to ferpipe correctly and records what a person reads in the
KFP UI (artifact metadata, metrics, reports).
"""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Markdown, Metrics, Model

from components.aggregation_stage import aggregation
from components.augmentation_stage import augmentation_stage
from components.clahe_stage import clahe_stage
from components.detection_stage import detection_stage
from components.fold_plan import fold_plan
from components.gather_stage import gather_shards
from components.input_stage import input_fingerprint, input_stage, shard_plan
from components.landmark_stage import landmark_stage
from components.prediction_stage import prediction_stage
from components.tracking_start import tracking_start
from components.training_stage import training_stage
from ferpipe.data.manifest import read_manifest
from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.demo.synthetic import make_demo_dataset

pytestmark = pytest.mark.slow


def artifact(kind, root: Path, name: str):
    return kind(name=name, uri=str(root / name), metadata={})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), subjects=3, per_expression=1)


@pytest.fixture(scope="module")
def chain(demo, tmp_path_factory):
    """Stages 1-5 called one after another as plain functions, as the DAG wires them (one shard here)."""
    root = tmp_path_factory.mktemp("chain")
    names = ("shards", "frames", "enhanced", "faces", "shard", "annotated", "fold")
    out = {name: artifact(Dataset, root, name) for name in names}
    out["preview"], out["plan"] = artifact(HTML, root, "preview"), artifact(Markdown, root, "plan")
    out["augmentation"], out["gathered"] = artifact(HTML, root, "augmentation"), artifact(HTML, root, "gathered")
    cache, work = str(root / "cache"), str(root / "work")
    out["fingerprint"] = input_fingerprint.python_func(data_uri=str(demo), cache_uri=cache)
    out["items"] = shard_plan.python_func(dataset="jaffe", data_uri=str(demo), fingerprint=out["fingerprint"],
                                          n_folds=10, shard_size=2000, work_uri=work, plan=out["shards"])
    input_stage.python_func(shard=out["items"][0], data_uri=str(demo), work_uri=work, cache_uri=cache,
                            frames=out["frames"])
    clahe_stage.python_func(frames=out["frames"], clip_limit=2.0, tile_grid=8, cache_uri=cache,
                                 enhanced=out["enhanced"])
    detection_stage.python_func(enhanced=out["enhanced"], confidence=0.5, on_no_face="skip", cache_uri=cache,
                             faces=out["faces"])
    landmark_stage.python_func(faces=out["faces"], source="dlib", cache_uri=cache, work_uri=work,
                               annotated=out["shard"], preview=out["preview"])
    gather_shards.python_func(plan=out["shards"], work_uri=work, clahe_clip_limit=2.0, clahe_tile_grid=8,
                              detection_confidence=0.5, on_no_face="skip", landmark_source="dlib",
                              annotated=out["annotated"], preview=out["gathered"])
    out["folds"] = fold_plan.python_func(annotated=out["annotated"], max_folds=0, plan=out["plan"])
    augmentation_stage.python_func(annotated=out["annotated"], fold=1, profile="smoke", dataset="jaffe", seed=0,
                             fold_data=out["fold"], preview=out["augmentation"])
    return out


def test_fingerprint_changes_with_the_data(demo, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo, copy)
    cache = str(tmp_path / "cache")
    before = input_fingerprint.python_func(data_uri=str(copy), cache_uri=cache)
    assert before == input_fingerprint.python_func(data_uri=str(demo), cache_uri="")
    (copy / "ZA.HA1.4.tiff").write_bytes((copy / "ZA.AN1.1.tiff").read_bytes())
    assert input_fingerprint.python_func(data_uri=str(copy), cache_uri=cache) != before


def test_stage_components_pass_datasets_along(chain):
    assert chain["items"] == [f"0of1-{chain['items'][0].split('-')[1]}"] and chain["shards"].metadata["shards"] == 1
    assert chain["shards"].metadata["fingerprint"] == chain["fingerprint"]
    for name in ("frames", "enhanced", "faces", "shard", "annotated"):
        manifest = read_manifest(chain[name].path)
        assert len(manifest) == 21, name
        assert chain[name].metadata["ok"] == 21
    # A shard task's output is a manifest and one pack; the gathered dataset a manifest pointing at the
    # pack the landmark task published.
    assert sorted(p.name for p in Path(chain["faces"].path).rglob("*") if p.is_file()) == [
        "0of1.parquet", "manifest.parquet", "shard.json"]
    assert chain["shard"].metadata["published"].startswith(str(Path(chain["shard"].path).parent / "work" / "shards"))
    assert [p.name for p in Path(chain["annotated"].path).iterdir()] == ["manifest.parquet"]
    assert "<img src=\"data:image/png;base64," in Path(chain["gathered"].path).read_text()
    assert read_manifest(chain["faces"].path)["face_box"].notna().all()
    assert read_manifest(chain["annotated"].path)["landmarks"].map(len).eq(136).all()
    assert "<img src=\"data:image/png;base64," in Path(chain["preview"].path).read_text()


def test_fold_plan_lists_the_loso_folds_and_tables_them(chain):
    assert chain["folds"] == [0, 1, 2]
    table = Path(chain["plan"].path).read_text()
    assert table.startswith("| fold | test subjects |") and table.count("\n| ") == 3  # a row per fold


def test_augmentation_keeps_subjects_apart(chain):
    manifest = read_manifest(chain["fold"].path)
    sides = {s: set(manifest.loc[manifest["split"] == s, "subject"]) for s in ("train", "val", "test")}
    assert sides["test"] == {"ZB"} and not sides["test"] & (sides["train"] | sides["val"])
    assert chain["fold"].metadata["train_images"] == len(manifest[manifest["split"] == "train"])
    # Stage 5 writes the plan the training tasks augment by, and a picture of what they draw.
    assert json.loads(Path(chain["fold"].path, "fold.json").read_text())["augment"]["rotation_deg"] == 15.0
    assert Path(chain["fold"].path, "augmentation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(chain["augmentation"].path).read_text()
    assert page.count("data:image/png;base64,") == 1 and "epochs 1-4" in page


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """MLflow as `ferpipe run` keeps it: one SQLite file; the start step's parent run for KFP run run-123."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    parent = tracking_start.python_func(mlflow_uri=uri, experiment="components", kfp_run_id="run-123",
                                        kfp_run_name="components test", dataset="jaffe", network="el",
                                        profile="smoke", data_uri="", seed=0)
    assert len(parent) == 32
    return uri


@pytest.fixture(scope="module")
def trained(chain, tracking_uri, tmp_path_factory):
    from ferpipe.crossval.tracking import RUN_ID_VARIABLE

    root = tmp_path_factory.mktemp("models")
    models = []
    os.environ[RUN_ID_VARIABLE] = "run-123"  # the pod label's value on a cluster: the run is no input
    try:
        for slot in ENSEMBLE_PARTS:
            model = artifact(Model, root, slot)
            training_stage.python_func(fold_data=chain["fold"], network="el", slot=slot, profile="smoke",
                                       dataset="jaffe", seed=0, cache_uri=str(root / "cache"),
                                       work_uri=str(root / "work"), model=model, mlflow_uri=tracking_uri,
                                       experiment="components")
            models.append(model)
    finally:
        del os.environ[RUN_ID_VARIABLE]
    return models


def test_training_component_logs_every_epoch_to_its_member_run(trained, tracking_uri):
    from mlflow import MlflowClient

    from ferpipe.crossval.tracking import Tracking

    tracking, client = Tracking(tracking_uri, "components", "run-123"), MlflowClient(tracking_uri)
    summary = json.loads(Path(trained[0].path, "member.json").read_text())
    run = client.get_run(tracking.member_run(1, "eyebrows", "el"))
    assert run.info.status == "FINISHED" and run.data.tags["fold"] == "1" and run.data.params["slot"] == "eyebrows"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "finetune/val_loss")]
    finetune = [step for step, row in enumerate(summary["history"], start=1) if row["phase"] == "finetune"]
    assert steps == finetune  # each finetune epoch once, at its place in the whole history
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.weights.h5",
                                                                                  "model/member.json"}


def test_training_component_writes_a_model_and_its_history(chain, trained):
    model = trained[0]
    summary = json.loads(Path(model.path, "member.json").read_text())
    assert Path(model.path, "model.weights.h5").stat().st_size > 100_000
    assert summary["slot"] == "eyebrows" and summary["part"] == "eyebrows"
    assert [row["phase"] for row in summary["history"]][:1] == ["landmarks"]
    assert model.metadata["cached"] is False and model.metadata["fold"] == 1
    # The checkpoint a retry would resume from, keyed by what the member trains on, not by the run.
    from ferpipe.crossval.member_cache import member_key

    key = member_key(chain["fold"].path, "el", "eyebrows", "smoke", 0, "jaffe")
    mirror = Path(model.path).parent / "cache" / "checkpoints" / key
    state = json.loads((mirror / "state.json").read_text())
    assert state["complete"] and (mirror / "model.weights.h5").is_file()


def test_training_component_restores_from_the_cache(chain, trained, tmp_path):
    again = artifact(Model, tmp_path, "again")
    training_stage.python_func(fold_data=chain["fold"], network="el", slot="eyebrows", profile="smoke",
                               dataset="jaffe", seed=0, cache_uri=str(Path(trained[0].path).parent / "cache"),
                               work_uri="", model=again)
    assert again.metadata["cached"] is True
    assert Path(again.path, "model.weights.h5").read_bytes() == Path(trained[0].path, "model.weights.h5").read_bytes()


def test_train_eval_is_the_components_path(chain, trained, tmp_path):
    """`ferpipe train-eval` trains, augments and predicts through the DAG's steps: the same fold, seed and
    profile give the members and predictions the training and prediction components give."""
    from ferpipe.crossval.train_eval import train_eval

    train_eval(chain["annotated"].path, "el", "smoke", tmp_path, folds=[1], dataset="jaffe")
    for slot, model in zip(ENSEMBLE_PARTS, trained):
        ours = json.loads(Path(tmp_path, "folds", "fold1", slot, "member.json").read_text())["history"]
        theirs = json.loads(Path(model.path, "member.json").read_text())["history"]
        assert [(r["phase"], r["epoch"]) for r in ours] == [(r["phase"], r["epoch"]) for r in theirs]
        np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in theirs], rtol=1e-4)
    predictions = artifact(Dataset, tmp_path, "predictions")
    prediction_stage.python_func(fold_data=chain["fold"], **dict(zip(ENSEMBLE_PARTS, trained)), network="el",
                                 profile="smoke", dataset="jaffe", seed=0, work_uri=str(tmp_path / "work"),
                                 kfp_run_id="run-9", predictions=predictions, metrics=artifact(Metrics, tmp_path, "m"))
    ours, theirs = (pd.read_csv(p) for p in (tmp_path / "predictions" / "fold1.csv",
                                              Path(predictions.path, "predictions.csv")))
    assert list(ours["image_id"]) == list(theirs["image_id"]) and list(ours["ensemble"]) == list(theirs["ensemble"])
    sums = [c for c in ours.columns if c.startswith("sum_")]
    np.testing.assert_allclose(ours[sums].to_numpy(float), theirs[sums].to_numpy(float), atol=1e-3)


def test_prediction_and_aggregation_components(chain, trained, tracking_uri, tmp_path):
    predictions = artifact(Dataset, tmp_path, "predictions")
    fold_metrics = artifact(Metrics, tmp_path, "fold_metrics")
    work = str(tmp_path / "work")
    prediction_stage.python_func(fold_data=chain["fold"], **dict(zip(ENSEMBLE_PARTS, trained)), network="el",
                                 profile="smoke", dataset="jaffe", seed=0, work_uri=work, kfp_run_id="run-123",
                                 predictions=predictions, metrics=fold_metrics, mlflow_uri=tracking_uri,
                                 experiment="components")
    rows = pd.read_csv(Path(predictions.path, "predictions.csv"))
    assert len(rows) == 7 and set(rows["subject"]) == {"ZB"}
    assert set(ENSEMBLE_PARTS) | {"ensemble"} <= set(rows.columns)
    assert 0 <= fold_metrics.metadata["fold1_accuracy_ensemble"] <= 1
    assert Path(predictions.path, "gradcam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    study = json.loads(Path(predictions.path, "fold.json").read_text())["landmark_study"]
    assert set(study["members"]) == set(ENSEMBLE_PARTS) and study["images"] == 7

    outputs = {kind.__name__: artifact(kind, tmp_path, kind.__name__)
               for kind in (Dataset, Metrics, ClassificationMetrics, Markdown, HTML)}
    run_id = aggregation.python_func(
        folds=[1], network="el", profile="smoke", dataset="jaffe", data_uri=str(tmp_path), seed=0,
        mlflow_uri=tracking_uri, experiment="components", work_uri=work, kfp_run_id="run-123",
        fingerprint=chain["fingerprint"], annotated=chain["annotated"], reports=outputs["Dataset"],
        metrics=outputs["Metrics"], confusion=outputs["ClassificationMetrics"], report=outputs["Markdown"],
        report_html=outputs["HTML"], kfp_run_name="components test")
    from mlflow import MlflowClient

    from ferpipe.crossval.tracking import Tracking

    # The aggregation completed the start step's parent and reused the runs the tasks made: one fold, five members.
    assert run_id == Tracking(tracking_uri, "components", "run-123").find_pipeline_run()
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("components").experiment_id], "tags.kfp_run_id = 'run-123'")
    assert sorted(r.data.tags["run_kind"] for r in runs) == ["fold"] + ["member"] * 5 + ["pipeline"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert client.get_run(run_id).data.tags["kfp_run_name"] == "components test"
    matrix = outputs["ClassificationMetrics"].metadata["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]][:2] == ["angry", "disgust"]
    assert sum(map(sum, (r["row"] for r in matrix["rows"]))) == 7
    page = Path(outputs["HTML"].path).read_text()
    assert page.startswith("<!DOCTYPE html>") and chain["fingerprint"] in page and run_id in page
    assert page.count('<img src="data:image/png;base64,') >= 6  # five parts' and the ensemble's confusion at least
    assert "report.html" in {a.path for a in client.list_artifacts(run_id)}
    metrics = client.get_run(run_id).data.metrics
    assert {f"landmark_error_after/{slot}" for slot in ENSEMBLE_PARTS} <= set(metrics)
    # The figures beside accuracy: macro-F1, balanced accuracy, recall per class, the spread over folds.
    assert {"macro_f1/ensemble", "balanced_accuracy/ensemble", "recall/ensemble/angry",
            "fold_accuracy_median/ensemble"} <= set(metrics)
    assert not [name for name in metrics if name.startswith("optimistic")]  # a strict run has none
    assert client.get_run(run_id).data.tags["selection"] == "validation"
    assert outputs["Metrics"].metadata["macro_f1_ensemble"] == pytest.approx(metrics["macro_f1/ensemble"])
    assert "| EL |" in Path(outputs["Markdown"].path).read_text()
    assert Path(outputs["Dataset"].path, "confusion", "ensemble.png").is_file()
    assert Path(outputs["Dataset"].path, "gradcam", "fold1.png").read_bytes() == Path(predictions.path, "gradcam.png").read_bytes()
    with pytest.raises(ValueError, match=r"no result for folds \[0\]"):  # a fold that never reported is an error
        aggregation.python_func(
            folds=[0, 1], network="el", profile="smoke", dataset="jaffe", data_uri=str(tmp_path), seed=0,
            mlflow_uri="", experiment="components", work_uri=work, kfp_run_id="run-123", fingerprint="",
            annotated=chain["annotated"], reports=outputs["Dataset"], metrics=outputs["Metrics"],
            confusion=outputs["ClassificationMetrics"], report=outputs["Markdown"], report_html=outputs["HTML"])
    with pytest.raises(ValueError, match="no result"):  # another run's folds are not this run's
        aggregation.python_func(
            folds=[1], network="el", profile="smoke", dataset="jaffe", data_uri=str(tmp_path), seed=0,
            mlflow_uri="", experiment="components", work_uri=work, kfp_run_id="run-456", fingerprint="",
            annotated=chain["annotated"], reports=outputs["Dataset"], metrics=outputs["Metrics"],
            confusion=outputs["ClassificationMetrics"], report=outputs["Markdown"], report_html=outputs["HTML"])


def test_stage_components_run_under_the_local_runner(demo, tmp_path):
    """The local runner executes artifact-passing components only inside a pipeline: a small one here."""
    from kfp import dsl, local

    @dsl.pipeline
    def stages(data_uri: str, cache_uri: str, work_uri: str) -> Model:
        shards = shard_plan(dataset="jaffe", data_uri=data_uri, fingerprint="f", n_folds=10, shard_size=12,
                            work_uri=work_uri)
        with dsl.ParallelFor(shards.outputs["Output"]) as shard:
            frames = input_stage(shard=shard, data_uri=data_uri, work_uri=work_uri, cache_uri=cache_uri)
            enhanced = clahe_stage(frames=frames.outputs["frames"], clip_limit=2.0, tile_grid=8, cache_uri=cache_uri)
            faces = detection_stage(enhanced=enhanced.outputs["enhanced"], confidence=0.5, on_no_face="skip",
                                    cache_uri=cache_uri)
            stage4 = landmark_stage(faces=faces.outputs["faces"], source="dlib", cache_uri=cache_uri,
                                    work_uri=work_uri)
        annotated = gather_shards(plan=shards.outputs["plan"], work_uri=work_uri, clahe_clip_limit=2.0,
                                  clahe_tile_grid=8, detection_confidence=0.5, on_no_face="skip",
                                  landmark_source="dlib").after(stage4)
        fold_plan(annotated=annotated.outputs["annotated"], max_folds=2)
        fold = augmentation_stage(annotated=annotated.outputs["annotated"], fold=0, profile="smoke", dataset="jaffe",
                                  seed=0)
        return training_stage(fold_data=fold.outputs["fold_data"], network="baseline", slot="jaw", profile="smoke",
                              dataset="jaffe", seed=0, cache_uri="", work_uri="").outputs["model"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True)
    model = stages(data_uri=str(demo), cache_uri=str(tmp_path / "cache"), work_uri=str(tmp_path / "work")).output
    assert Path(model.path, "model.weights.h5").is_file()
    summary = json.loads(Path(model.path, "member.json").read_text())
    assert summary["network"] == "baseline" and summary["fold"] == 0
    shards = sorted((tmp_path / "root").glob("*/for-loop-*/landmark-stage/annotated"))
    assert len(shards) == 2  # 21 images at 12 a shard
    annotated = read_manifest(str(next((tmp_path / "root").glob("*/gather-shards/annotated"))))
    assert len(annotated) == 21 and annotated["status"].eq("ok").all() and annotated["shard"].nunique() == 2


def test_the_member_key_follows_the_training_code(chain, tmp_path, monkeypatch):
    from ferpipe.crossval import member_cache
    from ferpipe.version import code_fingerprint

    helper = tmp_path / "training_helper_for_test.py"
    helper.write_text("RATE = 1e-3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules, libraries = member_cache.TRAINING_CODE
    monkeypatch.setattr(member_cache, "TRAINING_CODE", ((*modules, "training_helper_for_test"), libraries))
    key = lambda: member_cache.member_key(chain["fold"].path, "el", "nose", "smoke", 0, "jaffe")  # noqa: E731
    before = key()
    assert key() == before
    helper.write_text("RATE = 1e-2\n")
    code_fingerprint.cache_clear()
    assert key() != before
