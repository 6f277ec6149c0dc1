"""Aggregation: every fold's predictions -> Table I, confusion matrix, MLflow, the KFP UI."""

from typing import List

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Markdown, Metrics, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def aggregate_results(predictions: Input[List[Dataset]], network: str, profile: str, dataset: str, data_uri: str,
                      seed: int, mlflow_uri: str, experiment: str, kfp_run_id: str, reports: Output[Dataset], metrics: Output[Metrics],
                      confusion: Output[ClassificationMetrics], report: Output[Markdown]) -> str:
    """Returns the MLflow parent run id (empty when mlflow_uri is empty)."""
    from ferpipe.crossval.report import publish

    outcome = publish([p.path for p in predictions], reports.path, network=network, profile=profile,
                      dataset=dataset, data_uri=data_uri, seed=seed, mlflow_uri=mlflow_uri, experiment=experiment,
                      kfp_run_id=kfp_run_id)
    for name, value in outcome.accuracy.items():
        metrics.log_metric(f"accuracy_{name}", value)
    confusion.log_confusion_matrix(outcome.classes, outcome.ensemble_confusion)
    with open(report.path, "w") as out:
        out.write(outcome.markdown)
    return outcome.mlflow_run_id
