"""The final model: the five members trained on every usable subject, fused, exported, registered in MLflow."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def final_model_stage(fold_data: Input[Dataset], eyebrows: Input[Model], eyes: Input[Model], nose: Input[Model],
                      mouth: Input[Model], jaw: Input[Model], reports: Input[Dataset], mlflow_run_id: str,
                      fingerprint: str, network: str, profile: str, dataset: str, seed: int, clahe_clip_limit: float,
                      clahe_tile_grid: int, detection_confidence: float, on_no_face: str, mlflow_uri: str,
                      experiment: str, kfp_run_id: str, ensemble: Output[Model]) -> str:
    """Returns the registered version's URI (models:/ferpipe-<dataset>-<network>/N), empty without MLflow.

    `ensemble` is the MLflow pyfunc directory (raw images in: stages 1-3 and 7 inside), usable as it is by
    `ferpipe predict --model`. `reports` is the aggregation's output: the cross-validated figures the
    version carries and the champion decision is made on. The five members arrive as five named inputs
    (KFP 2.5 has no collected lists), trained by the same training component as every fold. A cross-validation
    under test-fold selection is refused before anything is exported.
    """
    import json
    import os

    from ferpipe.console import for_task
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.preprocess.detection import DetectionSettings
    from ferpipe.preprocess.imaging import ClaheSettings
    from ferpipe.serving.final import export_final_model
    from ferpipe.serving.registry import check_registrable, register_final_model

    for_task()
    with open(os.path.join(reports.path, "results.json")) as file:
        results = json.load(file)
    check_registrable(results)  # the DAG never gets here under test-fold selection; nor may anything else
    settings = PreprocessSettings(clahe=ClaheSettings(clahe_clip_limit, clahe_tile_grid),
                                  detection=DetectionSettings(confidence=detection_confidence, on_no_face=on_no_face))
    members = [m.path for m in (eyebrows, eyes, nose, mouth, jaw)]
    info = export_final_model(fold_data.path, network, members, profile, ensemble.path, settings, seed, dataset)
    ensemble.metadata.update(framework="mlflow.pyfunc", classes=info["classes"], network=network)
    if not mlflow_uri:
        return ""
    outcome = register_final_model(ensemble.path, tracking_uri=mlflow_uri, experiment=experiment,
                                   parent_run_id=mlflow_run_id, dataset=dataset, network=network, results=results,
                                   data_fingerprint=fingerprint, kfp_run_id=kfp_run_id)
    ensemble.metadata.update(registered=outcome["uri"], champion=outcome["champion"], decision=outcome["decision"])
    print(f"registered {outcome['uri']}: {outcome['decision']}")
    return outcome["uri"]
