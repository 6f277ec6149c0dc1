"""Stage 1, input: fingerprint the raw data, then read it into 300x300 gray frames with a manifest."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def input_fingerprint(data_uri: str, cache_uri: str) -> str:
    """Everything under data_uri as one hash (never cached): from the S3 listing (key, size, ETag); locally
    names, sizes, times, and content hashes of what changed since the last run (an index in cache_uri)."""
    from ferpipe.console import for_task
    from ferpipe.data.fingerprint import fingerprint

    for_task()
    return fingerprint(data_uri, cache_uri or None)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def input_stage(dataset: str, data_uri: str, fingerprint: str, n_folds: int, cache_uri: str, frames: Output[Dataset],
                subject_meta_uri: str = ""):
    """Stage 1: every offered image -> one manifest row; ok rows -> 300x300 gray in 3 channels.

    `fingerprint` is unused here but keys KFP's cache: new data, new key. `subject_meta_uri` (a CSV of
    per-subject attributes; empty: the dataset's own) joins age, gender, ... into the manifest.
    """
    from ferpipe.console import for_task
    from ferpipe.data.datasets import DatasetOptions
    from ferpipe.preprocess.runner import ingest, stage_metadata, summary

    for_task()
    options = DatasetOptions(n_folds=n_folds, subject_meta=subject_meta_uri or None)
    manifest = ingest(dataset, data_uri, frames.path, options=options, cache=cache_uri or None)
    frames.metadata.update(stage_metadata(manifest), fingerprint=fingerprint)
    print(summary(manifest))
