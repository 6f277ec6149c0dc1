"""After the shard loop: every planned shard's stage-4 output in one dataset, for the folds and the reports."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gather_shards(plan: Input[Dataset], work_uri: str, clahe_clip_limit: float, clahe_tile_grid: int,
                  detection_confidence: float, on_no_face: str, landmark_source: str,
                  annotated: Output[Dataset], preview: Output[HTML]):
    """One manifest over every planned shard, read from where the landmark tasks published them
    (<work_uri>/shards/, named by content: the settings here say which); a missing shard is an error
    naming it. The packs are referenced where they lie, not copied. Runs after the whole loop, as the
    aggregation does after the folds (KFP 2.5 cannot pass a collected list out of a loop)."""
    from ferpipe.console import for_task
    from ferpipe.data.storage import open_store
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.preprocess.detection import DetectionSettings
    from ferpipe.preprocess.imaging import ClaheSettings
    from ferpipe.preprocess.landmarks import LandmarkSettings
    from ferpipe.preprocess.preview import landmark_page
    from ferpipe.data.manifest import status_counts
    from ferpipe.preprocess.runner import summary
    from ferpipe.preprocess.sharded import gather

    for_task()
    settings = PreprocessSettings(clahe=ClaheSettings(clahe_clip_limit, clahe_tile_grid),
                                  detection=DetectionSettings(confidence=detection_confidence, on_no_face=on_no_face),
                                  landmarks=LandmarkSettings(source=landmark_source))
    manifest = gather(plan.path, work_uri, annotated.path, settings)
    annotated.metadata.update(images=len(manifest), shards=int(manifest["shard"].nunique()), **status_counts(manifest))
    with open(preview.path, "w") as page:
        page.write(landmark_page(manifest, open_store(annotated.path)))
    print(summary(manifest))
