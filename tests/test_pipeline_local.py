"""The whole DAG under KFP's local runner: artifacts, MLflow runs, and a rerun that the caches absorb."""

import json

import pytest
from mlflow import MlflowClient

from ferpipe.data.parts import ENSEMBLE_PARTS
from pipelines.local_run import run_locally

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(smoke_demo):
    return smoke_demo


@pytest.fixture(scope="module")
def first_run(smoke_run):
    return smoke_run


def runs_of(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ferpipe")
    return client.search_runs([experiment.experiment_id], max_results=500)


def check_mlflow_tree(uri: str, parent_id: str, folds: int, synthetic: bool):
    runs = runs_of(uri)
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[parent_id]
    assert parent.data.tags["synthetic_data"] == str(synthetic)
    assert parent.data.tags["kfp_run_id"] and parent.data.tags["kfp_run_name"]
    # One tree per KFP run: no task, retry or rerun left a second parent, fold or member.
    this_run = [r for r in runs if r.data.tags.get("kfp_run_id") == parent.data.tags["kfp_run_id"]]
    assert len(this_run) == 1 + folds * (1 + len(ENSEMBLE_PARTS))
    assert all(r.info.status == "FINISHED" for r in this_run)
    for name in (*ENSEMBLE_PARTS, "ensemble"):
        assert 0.0 <= parent.data.metrics[f"accuracy/{name}"] <= 1.0
    fold_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(fold_runs) == folds
    client = MlflowClient(uri)
    aggregated_at = client.get_metric_history(parent_id, "accuracy/ensemble")[0].timestamp
    for fold in fold_runs:
        members = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == fold.info.run_id]
        assert sorted(r.data.tags["slot"] for r in members) == sorted(ENSEMBLE_PARTS)
        assert 0.0 <= fold.data.metrics["accuracy/ensemble"] <= 1.0
        # Logged by the fold's own tasks while the pipeline ran, not by the aggregation afterwards.
        assert client.get_metric_history(fold.info.run_id, "accuracy/ensemble")[0].timestamp < aggregated_at
        member = members[0]
        epochs = client.get_metric_history(member.info.run_id, "finetune/val_loss")
        assert len(epochs) >= 1 and len({m.step for m in epochs}) == len(epochs)
        assert max(m.timestamp for m in epochs) < aggregated_at
        assert any(a.path == "model" for a in client.list_artifacts(member.info.run_id))
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"table.md", "report.md", "report.html", "confusion", "complexity.md", "results.json"} <= artifacts
    return parent


def test_stages_run_per_shard_and_write_a_pack_not_a_file_per_image(first_run):
    shards = sorted(first_run.run_dir.glob("for-loop-*/landmark-stage/annotated"))
    assert len(shards) == 2
    for stage, output in (("input-stage", "frames"), ("clahe-stage", "enhanced"), ("detection-stage", "faces"),
                          ("landmark-stage", "annotated")):
        folders = sorted(first_run.run_dir.glob(f"for-loop-*/{stage}/{output}"))
        files = [p for folder in folders for p in folder.rglob("*") if p.is_file()]
        assert len(folders) == 2 and len(files) == 2 * 3, stage  # manifest, shard.json and one pack a shard
    gathered = first_run.run_dir / "gather-shards" / "annotated"
    assert [p.name for p in gathered.iterdir()] == ["manifest.parquet"]
    fold_data = sorted(first_run.run_dir.glob("for-loop-*/augmentation-stage/fold_data"))
    assert fold_data and all(not list(f.rglob("*.png"))[1:] for f in fold_data)  # the preview only, no crops


def test_local_pipeline_writes_results_and_the_mlflow_tree(first_run):
    results = json.loads((first_run.results / "results.json").read_text())
    assert set(results["folds"]) == {"0", "1"} and results["overall"]["images"] == 14
    assert (first_run.results / "confusion" / "ensemble.png").stat().st_size > 5000
    assert sorted(p.name for p in (first_run.results / "gradcam").iterdir()) == ["fold0.png", "fold1.png"]
    assert "SYNTHETIC" in (first_run.results / "report.md").read_text()
    check_mlflow_tree(first_run.mlflow_uri, first_run.mlflow_run_id, folds=2, synthetic=True)
    check_registered_model(first_run, "ferpipe-jaffe-el", results)


def check_registered_model(run, name: str, results: dict) -> None:
    """The final model: registered with its cross-validated figures and lineage, champion as the first version."""
    client = MlflowClient(run.mlflow_uri)
    assert run.registered_model() == f"models:/{name}/1"
    version = client.get_model_version(name, "1")
    assert version.aliases == ["champion"]
    assert float(version.tags["cv_accuracy"]) == pytest.approx(results["overall"]["accuracy"]["ensemble"], abs=1e-6)
    assert version.tags["kfp_run_id"] and version.tags["data_fingerprint"] and version.tags["code_version"]
    assert version.run_id == run.mlflow_run_id  # logged in the parent run that holds the cross-validation


def test_rerun_on_unchanged_data_recomputes_nothing_the_caches_cover(first_run, demo):
    again = run_locally(first_run.out, dict(data_uri=str(demo), dataset="jaffe", network="el", profile="smoke",
                                     max_folds=2, shard_size=12))
    summary = again.cache_summary()
    assert summary["input-stage"] == (21, 21)
    for stage in ("clahe-stage", "detection-stage", "landmark-stage"):
        assert summary[stage] == (21, 21), stage
    assert summary["training-stage"] == (15, 15)  # five per fold, five for the final model
    first = json.loads((first_run.results / "results.json").read_text())
    assert json.loads((again.results / "results.json").read_text())["overall"] == first["overall"]
    # Members answered by the cache still get their runs in the new KFP run's tree, history included.
    check_mlflow_tree(again.mlflow_uri, again.mlflow_run_id, folds=2, synthetic=True)


def test_london_pipeline(london, tmp_path):
    run = run_locally(tmp_path, dict(data_uri=str(london), dataset="folder", network="el", profile="smoke", max_folds=1))
    results = json.loads((run.results / "results.json").read_text())
    assert results["classes"] == ["happy", "neutral"] and results["overall"]["images"] == 22
    # subjects.csv beside the class folders is picked up: accuracy per gender and age band, every image placed.
    groups = results["groups"]["attributes"]
    assert sum(g["images"] for g in groups["gender"]) == 22 and {g["group"] for g in groups["gender"]} <= {"female", "male"}
    assert {g["group"] for g in groups["age"]} <= {"18-24", "25-34", "35-44", "45-54", "55-64", "unknown"}
    assert set(results["landmark_study"]["members"]) == set(ENSEMBLE_PARTS)
    page = (run.results / "report.html").read_text()
    assert "Accuracy per group of people" in page and "female" in page and "18-24" in page
    parent = check_mlflow_tree(run.mlflow_uri, run.mlflow_run_id, folds=1, synthetic=False)
    assert "group_images/gender/female" in parent.data.metrics
    check_registered_model(run, "ferpipe-folder-el", results)


def test_a_test_fold_run_reports_both_figures_trains_no_final_model_and_registers_nothing(demo, tmp_path, capsys):
    from ferpipe.model.profiles import OPTIMISTIC
    from pipelines.local_run import show_outcome

    run = run_locally(tmp_path, dict(data_uri=str(demo), dataset="jaffe", network="el", profile="smoke", max_folds=1,
                                     selection="test-fold", expression="head-only"))
    results = json.loads((run.results / "results.json").read_text())
    assert results["selection"] == "test-fold" and results["expression"] == "head-only"
    assert results["optimistic"]["label"] == OPTIMISTIC and results["optimistic"]["overall"]["images"] == 7
    epochs = results["folds"]["0"]["optimistic"]["epochs"]
    assert {e["phase"] for e in epochs.values()} == {"head"}  # head-only: the head phase is the last
    assert run.cache_summary()["training-stage"] == (0, 5)  # the fold's five; no final members
    assert run.registered_model() == ""
    client = MlflowClient(run.mlflow_uri)
    assert client.search_registered_models() == []
    parent = client.get_run(run.mlflow_run_id)
    assert parent.data.tags["optimistic"] == OPTIMISTIC and parent.data.tags["expression"] == "head-only"
    assert "optimistic/accuracy/ensemble" in parent.data.metrics
    show_outcome(run)
    shown = capsys.readouterr().out
    assert f"| EL ({OPTIMISTIC}) |" in shown and "No model was registered" in shown and "model:  " not in shown
