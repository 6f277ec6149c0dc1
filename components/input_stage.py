"""Stage 1, input: fingerprint the raw data, plan its shards, then read one shard into 300x300 gray frames."""

from typing import List

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
def shard_plan(dataset: str, data_uri: str, fingerprint: str, n_folds: int, shard_size: int, work_uri: str,
               plan: Output[Dataset], subject_meta_uri: str = "") -> List[str]:
    """Every offered image -> one plan row with its shard, fold and subject attributes; returns the shards.

    Each shard's offers go to <work_uri>/offers/<shard>-<key>.parquet, named by their content, and the
    returned items are those names: a shard task's only identity, so KFP's cache answers the shards whose
    images did not change. `fingerprint` is unused here but keys KFP's cache: new data, a new plan.
    `subject_meta_uri` (a CSV of per-subject attributes; empty: the dataset's own) joins age, gender, ...
    """
    from ferpipe.console import for_task
    from ferpipe.data.datasets import DatasetOptions
    from ferpipe.preprocess.sharded import plan as plan_shards

    for_task()
    options = DatasetOptions(n_folds=n_folds, subject_meta=subject_meta_uri or None)
    manifest, items = plan_shards(dataset, data_uri, work_uri, plan.path, options, shard_size)
    plan.metadata.update(images=len(manifest), shards=len(items), fingerprint=fingerprint)
    print(f"{len(manifest)} images offered, in {len(items)} shards of about {shard_size}")
    return items


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def input_stage(shard: str, data_uri: str, work_uri: str, cache_uri: str, frames: Output[Dataset]):
    """Stage 1 over one shard: every offer -> one manifest row; ok rows -> 300x300 gray in 3 channels, packed."""
    from ferpipe.console import for_task
    from ferpipe.preprocess.runner import stage_metadata, summary
    from ferpipe.preprocess.sharded import ingest_shard

    for_task()
    manifest = ingest_shard(shard, data_uri, work_uri, frames.path, cache=cache_uri or None)
    frames.metadata.update(stage_metadata(manifest), shard=shard)
    print(summary(manifest))
