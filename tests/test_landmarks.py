import numpy as np
import pytest

from ferpipe.data.parts import PARTS
from ferpipe.preprocess import imaging, landmarks
from ferpipe.preprocess.detection import FaceDetector, crop_face
from ferpipe.preprocess.landmarks import LandmarkPredictor, LandmarkSettings, frame_to_crop, plausible


def anatomy_problems(points: np.ndarray) -> list[str]:
    """What is wrong with a 68-point face, in image coordinates (y grows downwards)."""
    centre = {part: points[piece].mean(axis=0) for part, piece in PARTS.items()}
    problems = []
    if not centre["eyebrows"][1] < centre["eyes"][1] < centre["nose"][1] < centre["mouth"][1]:
        problems.append("not brows above eyes above nose above mouth")
    if not points[36:42, 0].mean() < points[42:48, 0].mean():
        problems.append("image-left eye (36-41) is not left of the other (42-47)")
    if not points[48, 0] < points[54, 0] or not points[0, 0] < points[16, 0]:
        problems.append("mouth corners or jaw ends in the wrong order")
    return problems


def test_dlib_points_on_a_real_face_are_anatomically_sane(face_gray):
    frame = imaging.equalize_contrast(imaging.to_frame(face_gray))
    face = FaceDetector().detect(frame)
    points = LandmarkPredictor().predict(crop_face(frame, face.box))
    assert points.shape == (68, 2) and points.dtype == np.float32
    assert anatomy_problems(points) == []
    assert plausible(points, 0.1)


def test_frame_to_crop_matches_the_crop_map():
    box = (50.0, 100.0, 150.0, 180.0)
    points = np.array([[50, 100], [150, 180], [100, 140]], dtype=np.float32)
    assert np.allclose(frame_to_crop(points, box), [[0, 0], [1, 1], [0.5, 0.5]])


def test_points_far_outside_the_crop_are_implausible():
    points = np.full((68, 2), 0.5, np.float32)
    points[:10] = 1.5
    assert not plausible(points, 0.1)
    assert plausible(points, 0.2)


def test_flatten_round_trip():
    points = np.random.default_rng(0).random((68, 2)).astype(np.float32)
    assert np.array_equal(landmarks.unflatten(landmarks.flatten(points)), points)


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="landmark source"):
        LandmarkSettings(source="guess")
