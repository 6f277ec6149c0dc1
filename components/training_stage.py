"""Stage 6, training one ensemble member on a GPU node."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def training_stage(fold_data: Input[Dataset], network: str, slot: str, profile: str, dataset: str, seed: int,
                   cache_uri: str, work_uri: str, model: Output[Model], mlflow_uri: str = "",
                   experiment: str = "ferpipe"):
    """Member `slot` (eyebrows, eyes, nose, mouth or jaw) of `network`: transfer learning in three phases
    (el, ftl) or direct training (baseline), early stopping on the validation subjects.

    No input names the KFP run, so KFP's cache reuses the task when its fold's data and settings are
    unchanged. The checkpoint is mirrored after every epoch to <cache_uri>/checkpoints/<member key>/
    (<work_uri>/... without a cache), keyed by what the member is trained on: a retry on another node
    resumes from the last epoch written. Its MLflow run hears every epoch as it ends, the pipeline run
    taken from the pod's environment (ferpipe/crossval/tracking.py).
    """
    from ferpipe.console import for_task
    from ferpipe.crossval.fold_dataset import read_fold_info
    from ferpipe.crossval.member_cache import train_or_restore
    from ferpipe.crossval.tracking import MemberLog

    for_task()
    live = MemberLog(mlflow_uri, experiment, read_fold_info(fold_data.path)["fold"], network, slot)
    summary, cached = train_or_restore(fold_data.path, network, slot, profile, model.path, seed, dataset, cache_uri,
                                       checkpoint_uri=cache_uri or work_uri, on_epoch=live.on_epoch)
    live.finish(summary, model.path)
    model.metadata.update({k: v for k, v in summary.items() if k not in ("history", "classes")})
    model.metadata["cached"] = cached
    model.metadata["framework"] = "keras"
