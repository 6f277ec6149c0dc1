"""Batch scoring: a registered ferpipe model over every image under a bucket prefix, for scoring pipelines.

Not part of the training DAG: a scoring pipeline (or a recurring run) uses it
on new photos as they land, with the model a training run registered.
"""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def batch_scoring(model_uri: str, input_uri: str, mlflow_uri: str, predictions: Output[Dataset]) -> int:
    """`ferpipe predict` over `input_uri` (s3://bucket/prefix or a folder): predictions.parquet, one row per file.

    model_uri: models:/ferpipe-<dataset>-<network>/N (or @champion), whose files are checked against the hash
    recorded at registration before they are loaded, or an exported folder.
    Returns the number of images scored; unreadable and faceless ones are rows with their status.
    """
    import os

    from ferpipe.console import for_task
    from ferpipe.serving.batch import predict_files

    for_task()
    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    os.makedirs(predictions.path, exist_ok=True)
    table = predict_files(model_uri, [input_uri], os.path.join(predictions.path, "predictions.parquet"))
    counts = table["status"].value_counts().to_dict()
    predictions.metadata.update(images=len(table), model=model_uri, **{k: int(v) for k, v in counts.items()})
    print(f"scored {len(table)} images from {input_uri}: {counts}")
    return len(table)
