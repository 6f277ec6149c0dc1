"""Stage 4, landmark annotation with dlib's 68-point predictor."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def landmark_stage(faces: Input[Dataset], source: str, cache_uri: str, annotated: Output[Dataset],
                   preview: Output[HTML]):
    """68 points per face in [0,1] of the crop; a page of faces with their points for the KFP UI."""
    from ferpipe.console import for_task
    from ferpipe.data.storage import open_store
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.preprocess.landmarks import LandmarkSettings
    from ferpipe.preprocess.preview import landmark_page
    from ferpipe.preprocess.runner import apply_stages, stage_metadata

    for_task()
    settings = PreprocessSettings(landmarks=LandmarkSettings(source=source))
    manifest = apply_stages(faces.path, annotated.path, ("landmarks",), settings, cache=cache_uri or None)
    annotated.metadata.update(stage_metadata(manifest))
    with open(preview.path, "w") as page:
        page.write(landmark_page(manifest, open_store(annotated.path)))
