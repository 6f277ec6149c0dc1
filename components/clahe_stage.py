"""Stage 2, CLAHE."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def clahe_stage(frames: Input[Dataset], clip_limit: float, tile_grid: int, cache_uri: str, enhanced: Output[Dataset]):
    """Contrast-limited adaptive histogram equalisation of every ok frame of a shard."""
    from ferpipe.console import for_task
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.preprocess.imaging import ClaheSettings
    from ferpipe.preprocess.runner import apply_stages, stage_metadata
    from ferpipe.preprocess.sharded import SHARD_FILE, next_shard_record

    for_task()
    settings, names = PreprocessSettings(clahe=ClaheSettings(clip_limit, tile_grid)), ("clahe",)
    enhanced.metadata.update(stage_metadata(apply_stages(
        frames.path, enhanced.path, names, settings, cache=cache_uri or None,
        extra={SHARD_FILE: next_shard_record(frames.path, names, settings)})))
