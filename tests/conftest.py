"""Shared fixtures: real test photos when ../shared is there, generated images otherwise."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LONDON = Path(os.environ.get("FERPIPE_LONDON", REPO.parent / "shared" / "data" / "london-faces"))


@pytest.fixture(scope="session")
def london() -> Path:
    """The London face set (CC BY 4.0), which lives outside the repo."""
    if not (LONDON / "happy").is_dir():
        pytest.skip(f"the London face set is not at {LONDON} (set FERPIPE_LONDON); real-image test skipped")
    return LONDON


@pytest.fixture(scope="session")
def face_gray() -> np.ndarray:
    """A real frontal face that ships inside scikit-image (public domain), grey, head and shoulders."""
    from skimage import data

    rgb = data.astronaut()[0:300, 90:330]
    return np.asarray(Image.fromarray(rgb).convert("L"))


def encode(array: np.ndarray, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def face_jpeg(face_gray) -> bytes:
    return encode(face_gray, "JPEG", quality=92)


def noise_image(seed: int = 0, size: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
