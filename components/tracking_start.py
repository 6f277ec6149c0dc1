"""The MLflow parent run, created as the pipeline starts, so that training tasks can nest their runs in it."""

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def tracking_start(mlflow_uri: str, experiment: str, kfp_run_id: str, kfp_run_name: str, dataset: str, network: str,
                   profile: str, data_uri: str, seed: int, selection: str = "validation", expression: str = "") -> str:
    """Finds or creates the parent run tagged with this KFP run's id; returns its id ('' when mlflow_uri is empty).

    The only task that creates the parent: every training, prediction and the
    aggregation run after it and find the parent by the KFP run id.
    """
    from ferpipe.console import for_task
    from ferpipe.crossval.report import EXPERIMENT, pipeline_run_identity
    from ferpipe.crossval.tracking import start_pipeline_run

    for_task()
    if not mlflow_uri:
        return ""
    name, tags, params = pipeline_run_identity(dataset, network, profile, data_uri, seed, kfp_run_id, kfp_run_name,
                                               selection, expression)
    return start_pipeline_run(mlflow_uri, experiment or EXPERIMENT, kfp_run_id, name, tags, params)
