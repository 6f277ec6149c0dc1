"""MLflow as the pipeline uses it on a cluster: a real tracking server on a real PostgreSQL, its artifacts
proxied to a real S3 server (SeaweedFS). The tasks' side (this process) holds no S3 credentials at all.

Covers the live run tree (parent at start, member runs hearing every epoch, fold results, the
aggregation completing it), idempotency under reruns and races, and 20 concurrent writers.
"""

import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from services import mlflow_server, postgres, seaweedfs

from ferpipe.crossval.report import publish
from ferpipe.crossval.tracking import (
    PARENT_RUN_VARIABLE,
    RUN_ID_VARIABLE,
    MemberLog,
    Tracking,
    epoch_metrics,
    log_fold_result,
    start_pipeline_run,
)
from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.evaluate.scoring import evaluate_predictions

pytestmark = pytest.mark.service
CLASSES = ["happy", "neutral"]
HISTORY = [{"phase": "landmarks", "epoch": 1, "loss": 0.3, "val_loss": 0.35, "seconds": 1.0},
           {"phase": "head", "epoch": 1, "loss": 0.9, "accuracy": 0.5, "val_loss": 0.8, "seconds": 1.0},
           {"phase": "finetune", "epoch": 1, "loss": 0.6, "accuracy": 0.7, "val_loss": 0.65, "seconds": 1.0}]


def member_summary(fold: int, slot: str, seed: int) -> dict:
    return {"fold": fold, "network": "el", "slot": slot, "part": slot, "seed": seed, "profile": "smoke",
            "history": HISTORY, "classes": CLASSES}


def fold_dir(root: Path, fold: int, rng) -> str:
    """A prediction task's output, as predict_fold writes it, with made-up probabilities."""
    labels = rng.integers(0, 2, 6)
    probabilities = rng.dirichlet([1, 1], size=(5, 6)).astype(np.float32)
    result = evaluate_predictions(labels, probabilities)
    members = {slot: member_summary(fold, slot, i) for i, slot in enumerate(ENSEMBLE_PARTS)}
    out = root / f"fold{fold}"
    out.mkdir(parents=True)
    names = np.array(CLASSES)
    rows = {"image_id": [f"f{fold}_{i}" for i in range(6)], "subject": ["s1"] * 6, "label": names[labels]}
    rows.update({slot: names[p.argmax(-1)] for slot, p in zip(ENSEMBLE_PARTS, probabilities)})
    rows["ensemble"] = names[probabilities.sum(0).argmax(-1)]
    (out / "predictions.csv").write_text(pd.DataFrame(rows).to_csv(index=False))
    if fold == 0:  # predict_fold writes no Grad-CAM picture for a fold without test images
        (out / "gradcam.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(512))
    (out / "fold.json").write_text(json.dumps({"fold": fold, "classes": CLASSES, "network": "el", "profile": "smoke",
                                               "train_images": 20, "test_subjects": ["s1"], **result,
                                               "members": members}))
    return str(out)


def trained_member_dir(root: Path, fold: int, slot: str, rng) -> Path:
    """What a training task leaves in its model output: weights and member.json."""
    out = root / f"member-{fold}-{slot}"
    out.mkdir(parents=True)
    (out / "model.weights.h5").write_bytes(rng.bytes(2048))
    (out / "member.json").write_text(json.dumps(member_summary(fold, slot, 0)))
    return out


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow-service")
    (work / "s3").mkdir()
    (work / "pg").mkdir()
    with seaweedfs(work / "s3", buckets=("mlflow",)) as s3, postgres(work / "pg") as database:
        assert database.startswith("postgresql+psycopg://")
        # Two workers, as in k8s/base/mlflow.yaml: writes from both meet in PostgreSQL.
        with mlflow_server(work, "s3://mlflow/artifacts", env=s3.env(), backend=database, workers=2) as uri:
            yield uri, s3


@pytest.fixture(autouse=True)
def no_s3_credentials_here(monkeypatch):
    """The tasks' side of every test: only the tracking URI, as a pipeline pod has for MLflow."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def runs_of(client: MlflowClient, experiment: str, kfp_run_id: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], f"tags.kfp_run_id = '{kfp_run_id}'", max_results=1000)


def tree(runs: list) -> tuple[list, list, list]:
    parents = [r for r in runs if r.data.tags.get("run_kind") == "pipeline"]
    folds = [r for r in runs if r.data.tags.get("run_kind") == "fold"]
    members = [r for r in runs if r.data.tags.get("run_kind") == "member"]
    return parents, folds, members


def stored_objects(s3) -> list[str]:
    from minio import Minio

    bucket = Minio(s3.endpoint.split("//")[1], s3.access_key, s3.secret_key, secure=False, region="us-east-1")
    return [o.object_name for o in bucket.list_objects("mlflow", recursive=True)]


def test_publish_alone_logs_the_whole_tree_with_artifacts_on_s3(tracking, tmp_path):
    """The aggregation completes what no task logged live (here: nothing was)."""
    uri, s3 = tracking
    rng = np.random.default_rng(0)
    dirs = [fold_dir(tmp_path / "predictions", fold, rng) for fold in (0, 1)]
    outcome = publish(dirs, str(tmp_path / "reports"), network="el", profile="smoke", dataset="folder",
                      data_uri=str(tmp_path), seed=0, mlflow_uri=uri, experiment="service", kfp_run_id="kfp-42",
                      kfp_run_name="nightly jaffe")
    client = MlflowClient(uri)
    parent = client.get_run(outcome.mlflow_run_id)
    assert parent.data.tags["kfp_run_id"] == "kfp-42" and parent.data.tags["synthetic_data"] == "False"
    assert parent.data.tags["kfp_run_name"] == "nightly jaffe"
    assert parent.data.metrics["accuracy/ensemble"] == pytest.approx(outcome.accuracy["ensemble"])
    parents, folds, members = tree(runs_of(client, "service", "kfp-42"))
    assert len(parents) == 1 and len(folds) == 2 and len(members) == 10
    assert {f.data.tags["mlflow.parentRunId"] for f in folds} == {parent.info.run_id}
    assert {m.data.tags["mlflow.parentRunId"] for m in members} == {f.info.run_id for f in folds}
    pictures = {f.data.tags["fold"]: {a.path for a in client.list_artifacts(f.info.run_id)} for f in folds}
    assert "gradcam.png" in pictures["0"] and "gradcam.png" not in pictures["1"]
    assert [m.step for m in client.get_metric_history(members[0].info.run_id, "finetune/val_loss")] == [3]
    # Artifacts went through the server to the S3 bucket, not to a local folder.
    downloaded = client.download_artifacts(parent.info.run_id, "confusion/ensemble.png", str(tmp_path / "dl"))
    assert Path(downloaded).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(name.endswith("confusion/ensemble.png") for name in stored_objects(s3))
    assert "report.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_live_tree_grows_as_tasks_run_and_reruns_duplicate_nothing(tracking, tmp_path):
    uri, s3 = tracking
    rng = np.random.default_rng(1)
    experiment, run_id, run_name = "live", "kfp-live-7", "ferpipe 2026-05-01"
    client = MlflowClient(uri)
    tags = {"kfp_run_id": run_id, "kfp_run_name": run_name, "dataset": "folder"}
    parent = start_pipeline_run(uri, experiment, run_id, "folder-el-smoke", tags, {"seed": 0})
    assert start_pipeline_run(uri, experiment, run_id, "folder-el-smoke", tags, {"seed": 0}) == parent  # retried

    # Training tasks: each epoch is in MLflow as soon as it ends, before the task finishes. A task learns its
    # pipeline run from its environment: the KFP run id on the cluster, the parent run under `ferpipe run`.
    for fold in (0, 1):
        for slot in ENSEMBLE_PARTS:
            found_by = {RUN_ID_VARIABLE: run_id} if slot != "jaw" else {PARENT_RUN_VARIABLE: parent}
            live = MemberLog(uri, experiment, fold, "el", slot, environment=found_by)
            assert live.run_id
            live.on_epoch(1, HISTORY[0])
            live.on_epoch(2, HISTORY[1])
            seen = client.get_metric_history(live.run_id, "head/val_loss")
            assert [(m.step, m.value) for m in seen] == [(2, 0.8)]
            # Killed here; the retried task finds the same run and its epochs, trains the rest, finishes.
            again = MemberLog(uri, experiment, fold, "el", slot, environment=found_by)
            assert again.run_id == live.run_id
            again.on_epoch(3, HISTORY[2])
            again.finish(member_summary(fold, slot, 0), trained_member_dir(tmp_path, fold, slot, rng))
    parents, folds, members = tree(runs_of(client, experiment, run_id))
    assert [p.info.run_id for p in parents] == [parent] and len(folds) == 2 and len(members) == 10
    assert all(m.info.status == "FINISHED" for m in members)
    assert all(f.info.status == "RUNNING" for f in folds)  # their predictions are still to come

    # Prediction tasks log each fold; the aggregation completes the parent, and a rerun of it changes nothing.
    dirs = [fold_dir(tmp_path / "predictions", fold, rng) for fold in (0, 1)]
    for directory in dirs:
        log_fold_result(uri, experiment, run_id, directory)
    for _ in range(2):
        outcome = publish(dirs, str(tmp_path / "reports"), network="el", profile="smoke", dataset="folder",
                          data_uri=str(tmp_path), seed=0, mlflow_uri=uri, experiment=experiment, kfp_run_id=run_id,
                          kfp_run_name=run_name)
        assert outcome.mlflow_run_id == parent
    parents, folds, members = tree(runs_of(client, experiment, run_id))
    assert len(parents) == 1 and len(folds) == 2 and len(members) == 10
    assert all(r.info.status == "FINISHED" for r in parents + folds + members)
    assert parents[0].data.tags["kfp_run_name"] == run_name
    for member in members:
        for key in epoch_metrics(1, HISTORY[0]) | epoch_metrics(2, HISTORY[1]) | epoch_metrics(3, HISTORY[2]):
            steps = [m.step for m in client.get_metric_history(member.info.run_id, key)]
            assert len(steps) == 1, (key, steps)  # each epoch once, live or backfilled, never twice
        assert 0.0 <= member.data.metrics["accuracy"] <= 1.0
        artifacts = [a.path for a in client.list_artifacts(member.info.run_id, "model")]
        assert sorted(artifacts) == ["model/member.json", "model/model.weights.h5"]
    for fold in folds:
        assert 0.0 <= fold.data.metrics["accuracy/ensemble"] <= 1.0
        assert len(client.get_metric_history(fold.info.run_id, "accuracy/ensemble")) == 1
    weights = [name for name in stored_objects(s3) if name.endswith("model/model.weights.h5")]
    assert len(weights) >= 10


def test_tasks_racing_for_a_nested_run_agree_on_one(tracking):
    """Five training tasks of a fold start at once; each asks for the fold run. One is created."""
    uri, _ = tracking
    experiment, run_id = "race", "kfp-race-1"
    start_pipeline_run(uri, experiment, run_id, "race", {"kfp_run_id": run_id}, {})
    contenders = [Tracking(uri, experiment, run_id) for _ in range(8)]
    barrier, answers = threading.Barrier(len(contenders)), []

    def claim(tracking: Tracking) -> None:
        barrier.wait()
        answers.append(tracking.fold_run(3))

    threads = [threading.Thread(target=claim, args=(t,)) for t in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == len(contenders) and len(set(answers)) == 1
    _, folds, _ = tree(runs_of(MlflowClient(uri), experiment, run_id))
    assert [f.info.run_id for f in folds] == answers[:1]  # the losers' candidates are deleted


WRITERS, SECONDS, PACE, KEYS = 20, 30.0, 0.25, ("loss", "val_loss", "val_accuracy")


def test_twenty_concurrent_writers_lose_no_metric(tracking):
    """20 member-like runs log an epoch row (3 metrics) every 0.25 s for 30 s, all at once, through the server."""
    uri, _ = tracking
    experiment, run_id = "writers", "kfp-writers-1"
    start_pipeline_run(uri, experiment, run_id, "writers", {"kfp_run_id": run_id}, {})
    runs = [Tracking(uri, experiment, run_id).member_run(0, f"writer{i}", "el") for i in range(WRITERS)]
    sent: dict[str, int] = {}
    latencies: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(WRITERS)

    def write(run: str) -> None:
        client = MlflowClient(uri)
        barrier.wait()
        deadline, step = time.monotonic() + SECONDS, 0
        try:
            while time.monotonic() < deadline:
                began = time.perf_counter()
                now = int(time.time() * 1000)
                client.log_batch(run, metrics=[Metric(k, step + i / 10, now, step) for i, k in enumerate(KEYS)])
                latencies.append(time.perf_counter() - began)
                step += 1
                time.sleep(max(0.0, PACE - (time.perf_counter() - began)))
        except BaseException as err:  # noqa: BLE001 - reported below with what had been sent
            errors.append(err)
        sent[run] = step

    started = time.perf_counter()
    threads = [threading.Thread(target=write, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 120)
    wall = time.perf_counter() - started
    assert not errors, errors[:3]
    client, arrived = MlflowClient(uri), 0
    for run in runs:
        for i, key in enumerate(KEYS):
            history = client.get_metric_history(run, key)
            assert sorted((m.step, m.value) for m in history) == [(s, s + i / 10) for s in range(sent[run])]
            arrived += len(history)
    total = sum(sent.values()) * len(KEYS)
    assert arrived == total and min(sent.values()) >= SECONDS / PACE / 4  # every writer kept writing
    p50, p95 = statistics.median(latencies), statistics.quantiles(latencies, n=20)[-1]
    print(f"\n{WRITERS} writers, {wall:.1f} s: {total} metrics sent in {sum(sent.values())} batches, {arrived} "
          f"arrived; batch latency p50 {1000 * p50:.0f} ms, p95 {1000 * p95:.0f} ms (pid {os.getpid()})")
