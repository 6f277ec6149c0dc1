"""Stage 7, prediction: the fold's five members on its held-out subjects."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def predict_fold(fold_data: Input[Dataset], models: Input[List[Model]], network: str, profile: str, dataset: str,
                 seed: int, predictions: Output[Dataset], metrics: Output[Metrics]):
    """Each member's softmax, summed class-wise, argmax; every member's own pick beside it."""
    from ferpipe.crossval.steps import predict_fold as predict

    result = predict(fold_data.path, network, [m.path for m in models], profile, predictions.path, seed, dataset)
    for name, value in result["accuracy"].items():
        metrics.log_metric(f"fold{result['fold']}_accuracy_{name}", value)
    predictions.metadata.update(fold=result["fold"], images=result["images"])
