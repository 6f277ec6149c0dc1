import numpy as np
import pytest
from conftest import noise_image

from ferpipe.preprocess import imaging
from ferpipe.preprocess.detection import DetectionSettings, FaceDetector, clip_box, crop_face
from ferpipe.preprocess.pretrained import SSD_WEIGHTS_SHA1, ssd_files


@pytest.fixture(scope="module")
def detector():
    return FaceDetector(DetectionSettings())


def test_ssd_weights_come_from_the_wheel_with_the_expected_hash():
    import hashlib

    prototxt, weights = ssd_files()
    assert prototxt.is_file() and hashlib.sha1(weights.read_bytes()).hexdigest() == SSD_WEIGHTS_SHA1


def test_finds_the_real_face_with_high_confidence(detector, face_gray):
    frame = imaging.to_frame(face_gray)
    face = detector.detect(frame)
    assert face is not None and face.confidence > 0.9 and face.detector == "ssd"
    x0, y0, x1, y1 = face.box
    assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 300
    assert 60 < (x1 - x0) < 250  # a face, not the whole frame or a speck


def test_noise_has_no_face_and_the_fallback_is_recorded(face_gray):
    frame = imaging.to_frame(noise_image(3, 300))
    assert FaceDetector(DetectionSettings(on_no_face="skip")).detect(frame) is None
    assert FaceDetector(DetectionSettings(confidence=0.9999999)).detect(imaging.to_frame(face_gray)) is None


def test_unknown_fallback_is_a_clear_error():
    with pytest.raises(ValueError, match="on_no_face"):
        DetectionSettings(on_no_face="guess")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ((0.1, 0.2, 0.5, 0.6), (0.1, 0.2, 0.5, 0.6)),
        ((-0.05, 0.2, 0.5, 0.6), (0.0, 0.2, 0.5, 0.6)),  # slightly outside: clipped
        ((0.9, 0.9, 1.8, 1.8), None),  # mostly outside the frame: rejected
        ((1.2, 0.1, 1.5, 0.4), None),  # wholly outside
        ((0.5, 0.5, 0.4, 0.6), None),  # degenerate
        ((0.1, np.nan, 0.5, 0.6), None),
    ],
)
def test_boxes_are_clipped_or_rejected(raw, expected):
    box = clip_box(np.array(raw), min_inside=0.6)
    if expected is None:
        assert box is None
    else:
        assert np.allclose(box, expected)


def test_crop_maps_the_box_onto_the_crop():
    frame = np.zeros((300, 300, 3), np.uint8)
    frame[100:200, 50:150] = 255
    crop = crop_face(frame, (50.0, 100.0, 150.0, 200.0), 160)
    assert crop.shape == (160, 160, 3) and crop[5:-5, 5:-5].min() == 255
