"""MLflow: one parent run per pipeline run, a nested run per fold and per trained sub-network.

The parent carries the overall table (each sub-network's and the ensemble's
accuracy, as the paper's Table I), the summed confusion matrix as a picture,
the complexity report and the KFP run id. Fold runs carry their accuracies,
predictions and Grad-CAM picture; member runs their parameters, per-epoch
metrics and weights. Everything is logged after training by the aggregate
step, so training tasks need no MLflow credentials and a failed fold never
leaves half a run tree.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

HISTORY_KEYS_SKIPPED = {"phase", "epoch", "seconds"}


def _finite(values: dict) -> dict:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _epoch_metrics(history: list[dict]):
    """MLflow metrics for every epoch row: `<phase>/<metric>` at step = epoch counted across phases."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for step, row in enumerate(history, start=1):
        for key, value in _finite({k: v for k, v in row.items() if k not in HISTORY_KEYS_SKIPPED}).items():
            metrics.append(Metric(f"{row.get('phase', 'train')}/{key}", value, now, step))
    return metrics


def log_pipeline_run(tracking_uri: str, experiment: str, run_name: str, results: dict,
                     prediction_dirs: Sequence[str | Path], reports_dir: str | Path, params: dict,
                     tags: dict, complexity: str | None = None) -> str:
    """Log a finished pipeline run; returns the parent run's id."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    client = MlflowClient(tracking_uri)
    overall = results["overall"]
    with mlflow.start_run(run_name=run_name) as parent:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics({f"accuracy/{k}": v for k, v in _finite(overall["accuracy"]).items()})
        mlflow.log_metrics({f"mean_fold_accuracy/{k}": v for k, v in _finite(overall["mean_fold_accuracy"]).items()})
        mlflow.log_metric("test_images", overall["images"])
        mlflow.log_artifacts(str(reports_dir))
        if complexity:
            mlflow.log_text(complexity, "complexity.md")
        for directory in sorted(map(Path, prediction_dirs)):
            _log_fold(client, directory)
        return parent.info.run_id


def _log_fold(client, directory: Path) -> None:
    import mlflow

    from ferpipe.crossval.steps import FOLD_RESULT, GRADCAM_FILE

    fold = json.loads((directory / FOLD_RESULT).read_text())
    with mlflow.start_run(run_name=f"fold {fold['fold']}", nested=True):
        mlflow.set_tag("fold", fold["fold"])
        mlflow.log_params({"fold": fold["fold"], "test_subjects": len(fold["test_subjects"]),
                           "train_examples": fold["train_examples"]})
        mlflow.log_metrics({f"accuracy/{k}": v for k, v in _finite(fold["accuracy"]).items()})
        mlflow.log_metric("test_images", fold["images"])
        mlflow.log_artifact(str(directory / "predictions.csv"))
        if (directory / GRADCAM_FILE).is_file():  # absent when the fold had no test images
            mlflow.log_artifact(str(directory / GRADCAM_FILE))
        for slot, member in fold["members"].items():
            with mlflow.start_run(run_name=f"fold {fold['fold']} {slot}", nested=True) as run:
                mlflow.set_tags({"fold": fold["fold"], "slot": slot, "network": member["network"]})
                mlflow.log_params({k: v for k, v in member.items() if k not in ("history", "classes")})
                client.log_batch(run.info.run_id, metrics=_epoch_metrics(member["history"]))
                mlflow.log_metric("accuracy", fold["accuracy"][slot])
                mlflow.log_artifacts(str(directory / "members" / slot), artifact_path="model")
