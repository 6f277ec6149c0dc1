"""Stage 5: geometric augmentation of face crops and their landmarks, together.

One random 2x3 affine (flip, rotation, shear, translation composed) is applied
to the image with cv2.warpAffine and to the 68 points with the same matrix, so
image and landmarks cannot drift apart (the albumentations idea). A flip also
permutes point indices (`parts.FLIP_PERMUTATION`): after a flip the subject's
left eye is on the other side of the image and must keep its index.

Defaults are the authors' Keras `ImageDataGenerator(rotation_range=15,
width_shift_range=0.05, height_shift_range=0.05, shear_range=0.05,
horizontal_flip=True)` with its defaults `fill_mode='nearest'` and
`interpolation_order=1`: bilinear sampling, border pixels replicated
(cv2.BORDER_REPLICATE is 'nearest'). Keras reads `shear_range` in DEGREES, so
the authors' shear is at most 0.05 degrees, about 0.14 px across a 160 px crop:
practically none. We keep it to be faithful; raise `shear_deg` for real shear.

Coordinates: a landmark u in [0, 1] sits at pixel index u * size (stage 4
divides dlib's pixel indices by the crop size), so pixel i's centre is i/size
and the image centre is ((size - 1) / 2, (size - 1) / 2), as in Keras.

Points that leave the crop: a draw that pushes more than `max_leaving` points
(of all 68, whichever part a member regresses: one rule for every member) from inside
[0, 1] to outside is redrawn, up to `retries` times; if every draw loses
points, the one losing fewest is kept and its points are clipped to [0, 1].
Redrawing biases the transforms slightly towards small ones, which is what a
face crop allows anyway. All returned points are clipped to [0, 1].

Training draws afresh every epoch through `stream.BatchStream`, seeded by
(member, phase, epoch, batch); stage 5 records the settings and seed and
pictures the draws (crossval.fold_dataset). This module is numpy + OpenCV
only, so the stage-5 component stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ferpipe.data.parts import FLIP_PERMUTATION

BORDERS = {"replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}


@dataclass(frozen=True)
class AugmentSettings:
    rotation_deg: float = 15.0
    width_shift: float = 0.05  # fraction of the width
    height_shift: float = 0.05  # fraction of the height
    shear_deg: float = 0.05  # degrees, as Keras reads shear_range
    horizontal_flip: bool = True
    border: str = "replicate"
    max_leaving: int = 0
    retries: int = 5

    def __post_init__(self):
        if self.border not in BORDERS:
            raise ValueError(f"border must be one of {sorted(BORDERS)}, not {self.border!r}")


@dataclass(frozen=True)
class Transform:
    """A forward map from source to augmented pixel indices, plus whether it mirrors."""

    matrix: np.ndarray  # 2x3 float64
    flipped: bool


def compose(size: int, flipped: bool, rotation_deg: float, shift_x: float, shift_y: float, shear_deg: float) -> Transform:
    """The 2x3 affine of one draw: flip, then rotation and shear about the centre, then shift (pixels)."""
    c = (size - 1) / 2.0
    to_centre = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]], dtype=np.float64)
    flip = np.diag([-1.0 if flipped else 1.0, 1.0, 1.0])
    theta = math.radians(rotation_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    s = math.radians(shear_deg)
    shear = np.array([[1, -math.sin(s), 0], [0, math.cos(s), 0], [0, 0, 1]])  # Keras' shear matrix
    back = np.array([[1, 0, c + shift_x], [0, 1, c + shift_y], [0, 0, 1]], dtype=np.float64)
    matrix = back @ shear @ rotation @ flip @ to_centre
    return Transform(matrix[:2], flipped)


def draw_transform(rng: np.random.Generator, size: int, settings: AugmentSettings = AugmentSettings()) -> Transform:
    """One random transform, each parameter uniform in its +-range as ImageDataGenerator draws it."""
    flipped = bool(settings.horizontal_flip and rng.random() < 0.5)
    return compose(
        size,
        flipped,
        rng.uniform(-settings.rotation_deg, settings.rotation_deg),
        rng.uniform(-settings.width_shift, settings.width_shift) * size,
        rng.uniform(-settings.height_shift, settings.height_shift) * size,
        rng.uniform(-settings.shear_deg, settings.shear_deg),
    )


def transform_points(points: np.ndarray, transform: Transform, size: int) -> np.ndarray:
    """(68, 2) points in [0,1] -> where the transform puts them, unclipped, indices permuted on a flip."""
    pixels = points.astype(np.float64) * size
    moved = pixels @ transform.matrix[:, :2].T + transform.matrix[:, 2]
    moved = (moved / size).astype(np.float32)
    if transform.flipped:
        # FLIP_PERMUTATION[i] is the index point i takes after the flip.
        mirrored = np.empty_like(moved)
        mirrored[FLIP_PERMUTATION] = moved
        moved = mirrored
    return moved


def warp_image(image: np.ndarray, transform: Transform, settings: AugmentSettings = AugmentSettings()) -> np.ndarray:
    height, width = image.shape[:2]
    return cv2.warpAffine(
        image, transform.matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=BORDERS[settings.border]
    )


def _inside(points: np.ndarray) -> np.ndarray:
    return np.all((points >= 0.0) & (points <= 1.0), axis=-1)


def augment_example(
    image: np.ndarray, points: np.ndarray, rng: np.random.Generator, settings: AugmentSettings = AugmentSettings()
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (image, points) pair; see the module notes for points leaving the crop."""
    size = image.shape[1]
    if image.shape[0] != size:
        raise ValueError(f"augmentation expects square crops, got {image.shape[:2]}")
    was_inside = _inside(points)
    best: tuple[int, Transform, np.ndarray] | None = None
    for _ in range(settings.retries + 1):
        transform = draw_transform(rng, size, settings)
        moved = transform_points(points, transform, size)
        inside_before = was_inside[FLIP_PERMUTATION] if transform.flipped else was_inside
        leaving = int(np.sum(inside_before & ~_inside(moved)))
        if best is None or leaving < best[0]:
            best = (leaving, transform, moved)
        if leaving <= settings.max_leaving:
            break
    _, transform, moved = best
    return warp_image(image, transform, settings), np.clip(moved, 0.0, 1.0)


def augment_batch(
    images: np.ndarray, points: np.ndarray, rng: np.random.Generator, settings: AugmentSettings = AugmentSettings()
) -> tuple[np.ndarray, np.ndarray]:
    out_images = np.empty_like(images)
    out_points = np.empty_like(points, dtype=np.float32)
    for i in range(len(images)):
        out_images[i], out_points[i] = augment_example(images[i], points[i], rng, settings)
    return out_images, out_points


def to_network_input(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1], what the networks are fed."""
    return images.astype(np.float32) / 127.5 - 1.0


def member_seed(seed: int, position: int) -> int:
    """The seed of the ensemble's member at `position` (0-4) in a run seeded `seed`."""
    return seed * 100 + position


def stream_seed(member: int, phase_index: int) -> int:
    """The seed of a member's batches in its phase number `phase_index` (0 first): what training draws."""
    return member * 16 + phase_index
