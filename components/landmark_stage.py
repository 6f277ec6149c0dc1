"""Stage 4, landmark annotation with dlib's 68-point predictor; the shard's output is published for the gather."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def landmark_stage(faces: Input[Dataset], source: str, cache_uri: str, work_uri: str, annotated: Output[Dataset],
                   preview: Output[HTML]):
    """68 points per face in [0,1] of the crop; a page of the shard's faces with their points for the KFP UI.

    The shard's output is also published under <work_uri>/shards/, named by its content (offers, every
    stage's settings, the stage code), where the gather after the shard loop finds it.
    """
    from ferpipe.console import for_task
    from ferpipe.data.storage import open_store
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.preprocess.landmarks import LandmarkSettings
    from ferpipe.preprocess.preview import landmark_page
    from ferpipe.preprocess.runner import apply_stages, stage_metadata
    from ferpipe.preprocess.sharded import SHARD_FILE, next_shard_record, publish_shard

    for_task()
    settings, names = PreprocessSettings(landmarks=LandmarkSettings(source=source)), ("landmarks",)
    manifest = apply_stages(faces.path, annotated.path, names, settings, cache=cache_uri or None,
                            extra={SHARD_FILE: next_shard_record(faces.path, names, settings)})
    annotated.metadata.update(stage_metadata(manifest), published=publish_shard(annotated.path, work_uri))
    with open(preview.path, "w") as page:
        page.write(landmark_page(manifest, open_store(annotated.path)))
