"""Stage 4: 68 facial landmarks per face crop, normalised to [0,1] in the crop.

dlib's ERT predictor was trained on boxes from dlib's own HOG detector, which
sit lower and tighter than the SSD's: given the whole SSD crop, it places the
brows on the forehead. So it gets the HOG-shaped box inside the crop, measured
on the London set (204 faces; HOG box in SSD-box units: left -0.064, top 0.177,
right 0.996, bottom 0.954, sd ~0.04). That halves the distance to the points
dlib finds from its own detector (0.012 -> 0.007 of the box width). For CK+, the dataset's own AAM points can
be used instead (`source='dataset'`): they are moved into the crop by the same
map that made the crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ferpipe.data.parts import N_POINTS
from ferpipe.preprocess.pretrained import dlib_68_model

LANDMARK_SOURCES = ("dlib", "dataset")


@dataclass(frozen=True)
class LandmarkSettings:
    source: str = "dlib"
    # More than this share of points outside the crop (with a 10% margin) means
    # the predictor did not find a face shape: recorded as no_landmarks.
    max_outside: float = 0.1

    def __post_init__(self):
        if self.source not in LANDMARK_SOURCES:
            raise ValueError(f"landmark source must be one of {LANDMARK_SOURCES}, not {self.source!r}")


# Where dlib's HOG detector would put the face box, as fractions of the SSD box (x0, y0, x1, y1).
HOG_BOX_IN_SSD_BOX = (-0.064, 0.177, 0.996, 0.954)


class LandmarkPredictor:
    def __init__(self, box: tuple[float, float, float, float] = HOG_BOX_IN_SSD_BOX):
        import dlib

        self._dlib = dlib
        self.predictor = dlib.shape_predictor(str(dlib_68_model()))
        self.box = box

    def predict(self, crop: np.ndarray) -> np.ndarray:
        """(68, 2) float32 points in [0,1] crop coordinates."""
        height, width = crop.shape[:2]
        gray = np.ascontiguousarray(crop[..., 0] if crop.ndim == 3 else crop)
        x0, y0, x1, y1 = (round(f * s) for f, s in zip(self.box, (width, height, width, height)))
        shape = self.predictor(gray, self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        return points / np.array([width, height], dtype=np.float32)


def frame_to_crop(points: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Frame-pixel points -> [0,1] crop coordinates, the map `detection.crop_face` used."""
    x0, y0, x1, y1 = box
    return ((points - [x0, y0]) / [x1 - x0, y1 - y0]).astype(np.float32)


def plausible(points: np.ndarray, max_outside: float) -> bool:
    outside = np.any((points < -0.1) | (points > 1.1), axis=1)
    return points.shape == (N_POINTS, 2) and np.isfinite(points).all() and outside.mean() <= max_outside


def flatten(points: np.ndarray) -> list[float]:
    """(68, 2) -> the manifest's 136 floats x0 y0 x1 y1 ..."""
    return points.astype(np.float32).reshape(-1).tolist()


def unflatten(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, 2)
