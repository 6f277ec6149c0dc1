"""Stages 1-4 as small functions over one record, composed by name.

A record is a manifest row (a dict) plus the transient `pixels` it carries
between stages. Each stage reads what it needs, adds its columns, and passes a
reject through untouched, so any run of consecutive stages is a fold over
`STAGES`: the CLI fuses all four in one process per image, a KFP component
runs one.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

from ferpipe.data.manifest import NO_FACE, NO_LANDMARKS, OK, OUTSIDE_DATA, TOO_LARGE
from ferpipe.data.storage import ObjectTooLarge, Store
from ferpipe.preprocess import imaging, landmarks
from ferpipe.preprocess.detection import DetectionSettings, FaceDetector, crop_face
from ferpipe.preprocess.imaging import ClaheSettings, Reject
from ferpipe.preprocess.landmarks import LandmarkPredictor, LandmarkSettings


@dataclass(frozen=True)
class PreprocessSettings:
    clahe: ClaheSettings = field(default_factory=ClaheSettings)
    detection: DetectionSettings = field(default_factory=DetectionSettings)
    landmarks: LandmarkSettings = field(default_factory=LandmarkSettings)
    frame_size: int = imaging.FRAME_SIZE

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PreprocessSettings":
        return cls(
            clahe=ClaheSettings(**values.get("clahe", {})),
            detection=DetectionSettings(**values.get("detection", {})),
            landmarks=LandmarkSettings(**values.get("landmarks", {})),
            frame_size=values.get("frame_size", imaging.FRAME_SIZE),
        )


class StageTools:
    """What stages need beyond the record; heavy models built once per process, on first use."""

    def __init__(self, settings: PreprocessSettings, source: Store | None = None):
        self.settings = settings
        self.source = source
        self._detector: FaceDetector | None = None
        self._predictor: LandmarkPredictor | None = None

    def load(self) -> None:
        """Build the models now (before forking workers that will share them)."""
        _ = self.detector, self.predictor

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = FaceDetector(self.settings.detection)
        return self._detector

    @property
    def predictor(self) -> LandmarkPredictor:
        if self._predictor is None:
            self._predictor = LandmarkPredictor()
        return self._predictor


def reject(record: dict, status: str, detail: str = "") -> dict:
    record.update(status=status, detail=detail, image_path=None)
    record.pop("pixels", None)
    return record


def read_input(record: dict, tools: StageTools) -> dict:
    """Stage 1: the offered file -> 300x300 gray repeated to 3 channels; sha256 of the original bytes."""
    if record["status"] == OUTSIDE_DATA:
        return record  # never read, never hashed
    try:
        data = record.pop("_data", None)
        data = tools.source.read_bytes(record["_key"]) if data is None else data
    except ObjectTooLarge as err:  # an object in the bucket above the store's size limit: never downloaded
        return reject(record, TOO_LARGE, err.strerror)
    except OSError as err:
        return reject(record, imaging.UNREADABLE, f"cannot read: {err.strerror or type(err).__name__}")
    record["sha256"] = hashlib.sha256(data).hexdigest()
    if record["status"] != OK:
        return record
    try:
        gray, record["exif_orientation"] = imaging.decode_upright(data)
    except Reject as err:
        return reject(record, err.status, err.detail)
    size = tools.settings.frame_size
    record["pixels"] = imaging.to_frame(gray, size)
    if record.get("_landmarks_key"):
        record["source_landmarks"] = _dataset_landmarks(tools.source, record["_landmarks_key"], gray.shape, size)
    return record


def _dataset_landmarks(source: Store, key: str, shape: tuple[int, int], size: int) -> list[float] | None:
    """The dataset's own points (CK+), moved into the 300x300 frame; None if the file is unusable."""
    from ferpipe.data.adapters.ckplus import parse_landmarks

    try:
        points = np.array(parse_landmarks(source.read_bytes(key).decode()), dtype=np.float32)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    height, width = shape
    return landmarks.flatten(points * [size / width, size / height])


def enhance_contrast(record: dict, tools: StageTools) -> dict:
    """Stage 2: CLAHE."""
    if record["status"] == OK:
        record["pixels"] = imaging.equalize_contrast(record["pixels"], tools.settings.clahe)
    return record


def detect_face(record: dict, tools: StageTools) -> dict:
    """Stage 3: the most confident valid face, cropped to 160x160 (or no_face)."""
    if record["status"] != OK:
        return record
    face = tools.detector.detect(record["pixels"])
    if face is None:
        return reject(record, NO_FACE, f"no face above confidence {tools.settings.detection.confidence}")
    record.update(face_box=list(face.box), face_confidence=face.confidence, detector=face.detector)
    record["pixels"] = crop_face(record["pixels"], face.box, tools.settings.detection.crop_size)
    return record


def annotate_landmarks(record: dict, tools: StageTools) -> dict:
    """Stage 4: 68 points in [0,1] of the crop, from dlib or (CK+) from the dataset."""
    if record["status"] != OK:
        return record
    if tools.settings.landmarks.source == "dataset":
        if record.get("source_landmarks") is None:
            return reject(record, NO_LANDMARKS, "the dataset has no landmark file for this image")
        points = landmarks.frame_to_crop(landmarks.unflatten(record["source_landmarks"]), record["face_box"])
    else:
        points = tools.predictor.predict(record["pixels"])
    if not landmarks.plausible(points, tools.settings.landmarks.max_outside):
        return reject(record, NO_LANDMARKS, "landmarks fall outside the face crop")
    # The contract is [0,1] in the crop; the SSD box often cuts the chin, so jaw
    # points just outside it (within the plausibility margin) sit on the edge.
    record["landmarks"] = landmarks.flatten(np.clip(points, 0.0, 1.0))
    return record


STAGES = {
    "input": read_input,
    "clahe": enhance_contrast,
    "detect": detect_face,
    "landmarks": annotate_landmarks,
}
STAGE_ORDER = tuple(STAGES)


def run_stages(record: dict, names: tuple[str, ...], tools: StageTools) -> dict:
    for name in names:
        record = STAGES[name](record, tools)
    return record
