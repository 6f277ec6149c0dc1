"""The aggregate step against a real MLflow server whose artifacts live on a real S3 server (SeaweedFS)."""

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from services import mlflow_server, seaweedfs

from ferpipe.crossval.report import publish
from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.evaluate.scoring import evaluate_predictions

pytestmark = pytest.mark.service
CLASSES = ["happy", "neutral"]


def fold_dir(root: Path, fold: int, rng) -> str:
    """A prediction task's output, as predict_fold writes it, with made-up probabilities."""
    labels = rng.integers(0, 2, 6)
    probabilities = rng.dirichlet([1, 1], size=(5, 6)).astype(np.float32)
    result = evaluate_predictions(labels, probabilities)
    history = [{"phase": "landmarks", "epoch": 1, "loss": 0.3, "val_loss": 0.35},
               {"phase": "finetune", "epoch": 1, "loss": 0.6, "accuracy": 0.7, "val_loss": 0.65}]
    members = {slot: {"fold": fold, "network": "el", "slot": slot, "part": slot, "seed": i, "history": history,
                      "classes": CLASSES} for i, slot in enumerate(ENSEMBLE_PARTS)}
    out = root / f"fold{fold}"
    for slot in ENSEMBLE_PARTS:
        (out / "members" / slot).mkdir(parents=True)
        (out / "members" / slot / "model.weights.h5").write_bytes(rng.bytes(2048))
    (out / "predictions.csv").write_text("image_id,label\nx,happy\n")
    if fold == 0:  # predict_fold writes no Grad-CAM picture for a fold without test images
        (out / "gradcam.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(512))
    (out / "fold.json").write_text(json.dumps({"fold": fold, "classes": CLASSES, "network": "el", "profile": "smoke",
                                               "train_examples": 20, "test_subjects": ["s1"], **result,
                                               "members": members}))
    return str(out)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow-service")
    (work / "s3").mkdir()
    with seaweedfs(work / "s3", buckets=("mlflow",)) as s3:
        with mlflow_server(work, "s3://mlflow/artifacts", env=s3.env()) as uri:
            yield uri, s3


def test_publish_logs_the_run_tree_with_artifacts_on_s3(tracking, tmp_path):
    uri, s3 = tracking
    rng = np.random.default_rng(0)
    dirs = [fold_dir(tmp_path / "predictions", fold, rng) for fold in (0, 1)]
    outcome = publish(dirs, str(tmp_path / "reports"), network="el", profile="smoke", dataset="folder",
                      data_uri=str(tmp_path), seed=0, mlflow_uri=uri, experiment="service", kfp_run_id="kfp-42")
    client = MlflowClient(uri)
    parent = client.get_run(outcome.mlflow_run_id)
    assert parent.data.tags["kfp_run_id"] == "kfp-42" and parent.data.tags["synthetic_data"] == "False"
    assert parent.data.metrics["accuracy/ensemble"] == pytest.approx(outcome.accuracy["ensemble"])
    experiment = client.get_experiment(parent.info.experiment_id)
    runs = client.search_runs([experiment.experiment_id])
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    members = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {f.info.run_id for f in folds}]
    assert len(folds) == 2 and len(members) == 10
    pictures = {f.data.tags["fold"]: {a.path for a in client.list_artifacts(f.info.run_id)} for f in folds}
    assert "gradcam.png" in pictures["0"] and "gradcam.png" not in pictures["1"]
    assert [m.step for m in client.get_metric_history(members[0].info.run_id, "finetune/val_loss")] == [2]
    # Artifacts went through the server to the S3 bucket, not to a local folder.
    downloaded = client.download_artifacts(parent.info.run_id, "confusion/ensemble.png", str(tmp_path / "dl"))
    assert Path(downloaded).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from minio import Minio

    bucket = Minio(s3.endpoint.split("//")[1], s3.access_key, s3.secret_key, secure=False, region="us-east-1")
    stored = [o.object_name for o in bucket.list_objects("mlflow", recursive=True)]
    assert any(name.endswith("confusion/ensemble.png") for name in stored)
    assert any(name.endswith("model/model.weights.h5") for name in stored)
    assert "report.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
