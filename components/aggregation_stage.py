"""Aggregation: every fold's predictions -> Table I, confusion matrix, MLflow, the KFP UI."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def aggregation(folds: List[int], network: str, profile: str, dataset: str, data_uri: str, seed: int,
                mlflow_uri: str, experiment: str, work_uri: str, kfp_run_id: str, fingerprint: str,
                annotated: Input[Dataset], reports: Output[Dataset], metrics: Output[Metrics],
                confusion: Output[ClassificationMetrics], report: Output[Markdown], report_html: Output[HTML],
                kfp_run_name: str = "", expression: str = "") -> str:
    """Returns the MLflow parent run id (empty when mlflow_uri is empty).

    Runs after the whole fold loop and reads the planned folds' results from
    <work_uri>/<kfp_run_id>/folds/; a missing fold is an error, never a smaller table.
    `annotated` (stage 4's dataset) gives the report its data quality section: the
    manifest keeps every offered image with its reject reason; `fingerprint` names the raw data.
    `report_html` is the whole run in one self-contained page, shown inline in the run page.
    Under test-fold selection the optimistic figures go beside the strict ones, labelled, in every output.
    """
    import shutil

    from ferpipe.console import for_task
    from ferpipe.crossval.report import publish
    from ferpipe.crossval.steps import gather_fold_results

    for_task()
    with gather_fold_results(work_uri, kfp_run_id, [int(f) for f in folds]) as prediction_dirs:
        outcome = publish(prediction_dirs, reports.path, network=network, profile=profile, dataset=dataset,
                          data_uri=data_uri, seed=seed, mlflow_uri=mlflow_uri, experiment=experiment,
                          kfp_run_id=kfp_run_id, kfp_run_name=kfp_run_name, fingerprint=fingerprint,
                          dataset_dir=annotated.path, expression=expression)
    for name, value in outcome.accuracy.items():
        metrics.log_metric(f"accuracy_{name}", value)
    overall = outcome.results["overall"]
    metrics.log_metric("macro_f1_ensemble", overall["macro_f1"]["ensemble"])
    metrics.log_metric("balanced_accuracy_ensemble", overall["balanced_accuracy"]["ensemble"])
    if outcome.results.get("optimistic"):  # the run page lists metrics by name: the name carries the label
        optimistic = outcome.results["optimistic"]["overall"]
        metrics.log_metric("optimistic_test_fold_chose_checkpoint_accuracy_ensemble",
                           optimistic["accuracy"]["ensemble"])
    confusion.log_confusion_matrix(outcome.classes, outcome.ensemble_confusion)
    with open(report.path, "w") as out:
        out.write(outcome.markdown)
    shutil.copyfile(outcome.html_path, report_html.path)
    return outcome.mlflow_run_id
