"""Stage 3, face detection with OpenCV's res10 SSD."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def detection_stage(enhanced: Input[Dataset], confidence: float, on_no_face: str, cache_uri: str,
                    faces: Output[Dataset]):
    """The most confident valid face per frame of a shard, cropped to 160x160; no_face recorded otherwise."""
    from ferpipe.console import for_task
    from ferpipe.preprocess.chain import PreprocessSettings
    from ferpipe.preprocess.detection import DetectionSettings
    from ferpipe.preprocess.runner import apply_stages, stage_metadata
    from ferpipe.preprocess.sharded import SHARD_FILE, next_shard_record

    for_task()
    settings = PreprocessSettings(detection=DetectionSettings(confidence=confidence, on_no_face=on_no_face))
    names = ("detect",)
    faces.metadata.update(stage_metadata(apply_stages(
        enhanced.path, faces.path, names, settings, cache=cache_uri or None,
        extra={SHARD_FILE: next_shard_record(enhanced.path, names, settings)})))
