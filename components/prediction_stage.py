"""Stage 7, prediction: the fold's five members on its held-out subjects."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prediction_stage(fold_data: Input[Dataset], eyebrows: Input[Model], eyes: Input[Model], nose: Input[Model],
                     mouth: Input[Model], jaw: Input[Model], network: str, profile: str, dataset: str, seed: int,
                     work_uri: str, kfp_run_id: str, predictions: Output[Dataset], metrics: Output[Metrics],
                     mlflow_uri: str = "", experiment: str = "ferpipe"):
    """Each member's softmax, summed class-wise, argmax; every member's own pick beside it.

    The five members arrive as five named inputs, not a collected list, which KFP backends before
    2.14 cannot pass. The fold's result also goes to <work_uri>/<kfp_run_id>/folds/, where the
    aggregation step finds every fold (see pipelines/ferpipe_pipeline.py), and to the fold's MLflow run.
    """
    from ferpipe.console import for_task
    from ferpipe.crossval.steps import predict_fold, share_fold_result
    from ferpipe.crossval.tracking import log_fold_result

    for_task()
    members = [m.path for m in (eyebrows, eyes, nose, mouth, jaw)]
    result = predict_fold(fold_data.path, network, members, profile, predictions.path, seed, dataset)
    share_fold_result(predictions.path, work_uri, kfp_run_id, result["fold"])
    log_fold_result(mlflow_uri, experiment, kfp_run_id, predictions.path)
    for name, value in result["accuracy"].items():
        metrics.log_metric(f"fold{result['fold']}_accuracy_{name}", value)
    predictions.metadata.update(fold=result["fold"], images=result["images"])
