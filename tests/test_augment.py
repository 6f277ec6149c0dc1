"""Stage 5: one transform moves image and landmarks together; flips keep point meaning."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from science_fixtures import face_template, synthetic_face

from ferpipe.data.parts import FLIP_PERMUTATION, PARTS
from ferpipe.model.augment import (
    AugmentSettings,
    augment_example,
    compose,
    draw_transform,
    to_network_input,
    transform_points,
    warp_image,
)

SIZE = 160
CONSTANT = AugmentSettings(border="constant")


def mirror(points: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Where a horizontal flip of a size-wide image puts points (pixel index x -> size-1-x)."""
    return np.stack([(size - 1) / size - points[:, 0], points[:, 1]], axis=1)


def test_flipping_twice_is_the_identity():
    points = face_template()
    flip = compose(SIZE, True, 0, 0, 0, 0)
    once = transform_points(points, flip, SIZE)
    assert not np.allclose(once, points)
    np.testing.assert_allclose(transform_points(once, flip, SIZE), points, atol=1e-6)
    assert np.array_equal(FLIP_PERMUTATION[FLIP_PERMUTATION], np.arange(68))


def test_a_flipped_left_eye_lands_on_the_right_eye_indices():
    points = face_template()
    flipped = transform_points(points, compose(SIZE, True, 0, 0, 0, 0), SIZE)
    left_eye, right_eye = slice(36, 42), slice(42, 48)
    # The image-left eye, mirrored, is now the image-right eye and carries its indices ...
    np.testing.assert_allclose(flipped[right_eye], mirror(points)[FLIP_PERMUTATION[right_eye]], atol=1e-6)
    assert (flipped[right_eye, 0] > 0.5).all() and (flipped[left_eye, 0] < 0.5).all()
    # ... and the mirrored symmetric template is the template again, up to the half-pixel of the index flip.
    np.testing.assert_allclose(flipped, points - [1 / SIZE, 0], atol=1e-5)


def blob_centre(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre (x, y) in pixel indices."""
    gray = image[..., 0].astype(np.float64)
    ys, xs = np.mgrid[: gray.shape[0], : gray.shape[1]]
    return np.array([(gray * xs).sum(), (gray * ys).sum()]) / gray.sum()


def dot_at(point: np.ndarray, size: int = SIZE) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    ys, xs = np.mgrid[:size, :size]
    x, y = point * size
    blob = 255 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.5**2))
    image[...] = blob[..., None].astype(np.uint8)
    return image


TRANSFORMS = {
    "flip": (True, 0, 0, 0, 0),
    "rotation": (False, 15, 0, 0, 0),
    "shear": (False, 0, 0, 0, 10),
    "translation": (False, 0, 8, -8, 0),
    "all": (True, -12, -6, 5, 8),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_the_image_moves_where_the_landmarks_say(name):
    points = face_template()
    transform = compose(SIZE, *TRANSFORMS[name])
    moved = transform_points(points, transform, SIZE)
    # The point that now carries index i came from FLIP_PERMUTATION[i] when mirrored.
    for index in (0, 8, 19, 30, 36, 45, 48, 57):
        source = FLIP_PERMUTATION[index] if transform.flipped else index
        warped = warp_image(dot_at(points[source]), transform, CONSTANT)
        assert np.linalg.norm(blob_centre(warped) - moved[index] * SIZE) < 1.0, (name, index)


def test_random_draws_keep_image_and_points_together():
    rng = np.random.default_rng(3)
    points = face_template()
    for _ in range(10):
        transform = draw_transform(rng, SIZE, AugmentSettings(shear_deg=10))
        moved = transform_points(points, transform, SIZE)
        warped = warp_image(dot_at(points[FLIP_PERMUTATION[30] if transform.flipped else 30]), transform, CONSTANT)
        assert np.linalg.norm(blob_centre(warped) - moved[30] * SIZE) < 1.0


def test_draws_stay_within_the_authors_ranges():
    rng = np.random.default_rng(0)
    settings = AugmentSettings()
    flips = []
    for _ in range(300):
        t = draw_transform(rng, SIZE, settings)
        linear = t.matrix[:, :2] @ np.diag([-1.0 if t.flipped else 1.0, 1.0])
        angle = np.degrees(np.arctan2(linear[1, 0], linear[0, 0]))
        assert abs(angle) <= 15.01
        centre = np.array([(SIZE - 1) / 2] * 2)
        shift = t.matrix[:, :2] @ centre + t.matrix[:, 2] - centre
        assert np.all(np.abs(shift) <= 0.05 * SIZE + 1e-6)
        flips.append(t.flipped)
    assert 0.35 < np.mean(flips) < 0.65


def test_points_never_leave_the_unit_square_and_big_shifts_are_redrawn():
    image, points = synthetic_face("happy", np.random.default_rng(0))
    wild = AugmentSettings(rotation_deg=40, width_shift=0.3, height_shift=0.3, retries=20)
    rng = np.random.default_rng(1)
    kept_all = 0
    for _ in range(20):
        _, moved = augment_example(image, points, rng, wild)
        assert moved.min() >= 0.0 and moved.max() <= 1.0
        kept_all += np.all((moved > 0) & (moved < 1))
    assert kept_all >= 15  # redrawing finds transforms that keep the face in the crop


def test_network_input_scaling():
    pixels = np.array([[0, 127.5, 255]], dtype=np.float64).astype(np.uint8)
    np.testing.assert_allclose(to_network_input(pixels), [[-1.0, -0.0039215, 1.0]], atol=1e-6)


def test_shear_is_read_in_degrees_like_keras():
    # 0.05 degrees moves a point at the crop's top edge by ~0.07 px: the authors' shear is tiny.
    t = compose(SIZE, False, 0, 0, 0, 0.05)
    corner = transform_points(np.array([[0.5, 0.0]] * 68, np.float32), t, SIZE)[0]
    assert abs(corner[0] * SIZE - 0.5 * SIZE) < 0.1


def test_border_modes():
    image = np.full((SIZE, SIZE, 3), 200, np.uint8)
    t = compose(SIZE, False, 0, 20, 0, 0)
    assert warp_image(image, t, AugmentSettings(border="replicate"))[:, :10].min() == 200
    assert warp_image(image, t, AugmentSettings(border="constant"))[:, :10].max() == 0
    with pytest.raises(ValueError):
        AugmentSettings(border="wrap")
    assert cv2.BORDER_REPLICATE  # 'nearest' in Keras' terms
