"""A SYNTHETIC demo dataset in the JAFFE layout, made offline from one public-domain photo.

This is not JAFFE and not real expressions. Every image is scikit-image's
bundled astronaut photo (Eileen Collins, NASA, public domain; it ships inside
the scikit-image wheel, so nothing is downloaded), its 68 dlib landmarks moved
by hand-designed offsets typical of each expression, warped piecewise-affinely,
then varied per pseudo-subject (face shape, skin, tone, lighting, head
scale/shift) and per image (expression intensity, noise). It exists so that
`make run` exercises the real JAFFE adapter, detector and landmarker on a
machine that has no dataset; accuracies on it mean nothing about the paper.

Layout, as JAFFE: `<out>/ZA.HA1.12.tiff` = subject ZA, expression HA,
repetition 1, running number 12; 8-bit grayscale TIFF, `size` x `size`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from ferpipe.console import progress_bar
from ferpipe.data.parts import FLIP_PERMUTATION, N_POINTS

log = logging.getLogger(__name__)

# JAFFE's codes, in JAFFE's order; labels as in the manifest contract.
EXPRESSION_CODES: dict[str, str] = {
    "AN": "angry",
    "DI": "disgust",
    "FE": "fear",
    "HA": "happy",
    "NE": "neutral",
    "SA": "sad",
    "SU": "surprise",
}

# Bump when the images would change, so a cached folder is regenerated.
GENERATOR_VERSION = 1

# The real JAFFE subjects: synthetic ones must never be mistaken for them.
_JAFFE_SUBJECTS = frozenset({"KA", "KL", "KM", "KR", "MK", "NA", "NM", "TM", "UY", "YM"})
_FILE_RE = re.compile(r"^[A-Z]{2}\.(AN|DI|FE|HA|NE|SA|SU)\d+\.\d+\.tiff$")

README = """\
SYNTHETIC demo data -- NOT the JAFFE dataset.

Every image is derived from one photo: scikit-image's bundled `astronaut`
(Eileen Collins, NASA; public domain), which ships inside the scikit-image
package. Nothing here shows real facial expressions of real people.

How it was made (ferpipe/demo/synthetic.py, generator version {version}):
  1. dlib's frontal face detector and 68-point shape predictor find the
     landmarks of the photo's face.
  2. Per pseudo-subject ({subjects}; codes {codes}), a seeded random
     generator picks a face shape (eye distance, eye size, brow height, jaw
     width, face length, nose length and width, mouth width; applied as
     landmark offsets), skin tone, brightness, contrast, gamma, a lighting
     gradient and a small head scale/shift.
  3. Per expression, hand-designed landmark offsets (e.g. happy: mouth
     corners up and out; surprise: brows up, eyes wide, jaw dropped) are
     added, scaled by a random intensity per image ({per_expression} images per
     subject and expression).
  4. A piecewise-affine warp (Delaunay triangles over the landmarks plus fixed
     anchors around the face and on the border) moves the pixels; an open
     mouth is shaded dark, closed lips get a seam, the brows are drawn a
     little darker (the photo's are faint); tone changes and a little noise
     are applied.
  5. Saved as {size}x{size} 8-bit grayscale TIFF named like JAFFE:
     SUBJECT.EXPRESSIONn.NUMBER.tiff, e.g. ZA.HA1.4.tiff.

Parameters: seed={seed}, subjects={subjects}, per_expression={per_expression}, size={size}.
Use it to check that the pipeline runs; its accuracies say nothing about
real facial-expression recognition.
"""


# ---------------------------------------------------------------------------
# Landmark offsets. Units: the inter-ocular distance (IOD), in a face frame
# whose x runs along the eye line and y down the face, so the offsets mean the
# same for any head size or roll. Each entry is (outward, down) for a point on
# the image-left half (the subject's right); its mirror point gets the mirrored
# offset, midline points only their `down`.
# ---------------------------------------------------------------------------

# Image-left points of each left/right pair; the rest are midline points.
_IMAGE_LEFT = frozenset([*range(0, 8), *range(17, 22), 31, 32, *range(36, 42), 48, 49, 50, 58, 59, 60, 61, 67])


def _symmetric(spec: dict[int, tuple[float, float]]) -> np.ndarray:
    """(68, 2) offsets in the face frame (x to image right, y down) from a one-sided spec."""
    out = np.zeros((N_POINTS, 2))
    for i, (outward, down) in spec.items():
        mirror = int(FLIP_PERMUTATION[i])
        if mirror == i:
            out[i] = (0.0, down)
            continue
        left, right = (i, mirror) if i in _IMAGE_LEFT else (mirror, i)
        out[left] = (-outward, down)
        out[right] = (outward, down)
    return out


def _merge(*specs: dict[int, tuple[float, float]]) -> dict[int, tuple[float, float]]:
    merged: dict[int, tuple[float, float]] = {}
    for spec in specs:
        for i, (a, b) in spec.items():
            x, y = merged.get(i, (0.0, 0.0))
            merged[i] = (x + a, y + b)
    return merged


# Building blocks, so each expression reads like a list of facial actions.
def _brows(inner: tuple[float, float], mid: tuple[float, float], outer: tuple[float, float]):
    # 21 inner, 20/19 middle, 18/17 outer (mirrored to 22..26).
    return {21: inner, 20: mid, 19: mid, 18: outer, 17: outer}


def _upper_lids(down: float):
    return {37: (0.0, down), 38: (0.0, down)}


def _lower_lids(down: float):
    return {40: (0.0, down), 41: (0.0, down)}


def _corners(outward: float, down: float):
    # Outer (48) and inner (60) mouth corners move together; the lip points
    # next to them follow part of the way so the lip outline stays smooth.
    # Weights fall off with the square of the distance from the midline
    # (49/59 sit ~2/3, 50/58/61/67 ~1/3 of the way out), so the lip line bends
    # into a curved smile or frown instead of a V.
    near, far = 0.5, 0.12
    return {48: (outward, down), 60: (outward, down),
            49: (outward * near, down * near), 59: (outward * near, down * near),
            50: (outward * far, down * far), 58: (outward * far, down * far),
            61: (outward * far, down * far), 67: (outward * far, down * far)}


def _lower_lip(down: float, inner: bool = True):
    # inner=False moves only the outer outline: the lip gets thicker or
    # thinner while the mouth stays closed (pressed lips, a pout).
    outer = {58: (0.0, down), 57: (0.0, down)}
    return {**outer, 66: (0.0, down), 67: (0.0, down * 0.9)} if inner else outer


def _upper_lip(down: float, inner: bool = True):
    outer = {50: (0.0, down), 51: (0.0, down), 49: (0.0, down * 0.6)}
    return {**outer, 61: (0.0, down), 62: (0.0, down)} if inner else outer


def _jaw_drop(down: float):
    return {8: (0.0, down), 7: (0.0, down * 0.85), 6: (0.0, down * 0.55), 5: (0.0, down * 0.25)}


EXPRESSION_OFFSETS: dict[str, np.ndarray] = {
    "neutral": np.zeros((N_POINTS, 2)),
    # Zygomaticus: corners up and out, lips part a little, cheeks push the lower lids up.
    "happy": _symmetric(_merge(
        _corners(0.16, -0.17), _upper_lip(-0.02, inner=False),
        _lower_lip(0.12), _lower_lids(-0.05), _jaw_drop(0.06),
    )),
    # Brows and upper lids up, jaw dropped: an open, vertical mouth.
    "surprise": _symmetric(_merge(
        _brows((0.0, -0.24), (0.0, -0.27), (0.0, -0.2)), _upper_lids(-0.09), _lower_lids(0.03),
        _corners(-0.07, 0.12), _upper_lip(-0.04), _lower_lip(0.42), _jaw_drop(0.36),
    )),
    # Inner brows raised and drawn in, lids droop, corners down, chin pushes the lower lip up.
    "sad": _symmetric(_merge(
        _brows((-0.04, -0.17), (0.0, -0.06), (0.0, 0.06)), _upper_lids(0.05),
        _corners(-0.03, 0.17), _lower_lip(-0.04, inner=False), {8: (0.0, -0.03)},
    )),
    # Brows down and together, eyes narrowed, lips pressed thin, nostrils flared.
    "angry": _symmetric(_merge(
        _brows((-0.1, 0.17), (-0.06, 0.13), (0.0, 0.05)), _upper_lids(0.06), _lower_lids(-0.05),
        _corners(-0.06, 0.05), _upper_lip(0.06, inner=False), _lower_lip(-0.07, inner=False),
        {31: (0.05, 0.0), 8: (0.0, -0.03)},
    )),
    # Upper lip raised, nose wrinkled up, brows lowered, lower lids up.
    "disgust": _symmetric(_merge(
        _brows((-0.05, 0.12), (-0.02, 0.08), (0.0, 0.03)), _lower_lids(-0.06),
        {50: (0.0, -0.13), 51: (0.0, -0.14), 49: (0.02, -0.09), 61: (0.0, -0.1), 62: (0.0, -0.11)},
        {31: (0.04, -0.09), 32: (0.02, -0.09), 33: (0.0, -0.08), 30: (0.0, -0.06), 29: (0.0, -0.03)},
        _corners(0.0, 0.05), _lower_lip(0.03),
    )),
    # Brows up and together, eyes wide, lips stretched sideways and parted.
    "fear": _symmetric(_merge(
        _brows((-0.06, -0.2), (-0.03, -0.15), (0.0, -0.06)), _upper_lids(-0.09), _lower_lids(0.02),
        _corners(0.15, 0.05), _lower_lip(0.13), _jaw_drop(0.1),
    )),
}

# Face-shape variations, one coefficient each per subject (standard deviation
# in IOD below), to make pseudo-subjects whose faces differ like people's do.
_IDENTITY_SD: dict[str, float] = {
    "eye_distance": 0.05, "eye_size": 0.03, "brow_height": 0.06, "jaw_width": 0.09,
    "face_length": 0.1, "nose_length": 0.05, "nose_width": 0.05, "mouth_width": 0.06,
}
_IDENTITY_BASIS: dict[str, np.ndarray] = {
    "eye_distance": _symmetric({**{i: (1.0, 0.0) for i in range(36, 42)}, **{i: (0.6, 0.0) for i in range(17, 22)}}),
    "eye_size": _symmetric({**_upper_lids(-1.0), **_lower_lids(0.5)}),
    "brow_height": _symmetric({i: (0.0, -1.0) for i in range(17, 22)}),
    "jaw_width": _symmetric({i: (w, 0.0) for i, w in enumerate([0.3, 0.5, 0.8, 1.0, 1.0, 0.9, 0.6, 0.3])}),
    "face_length": _symmetric({
        **{i: (0.0, w) for i, w in zip(range(3, 9), [0.15, 0.3, 0.5, 0.7, 0.85, 1.0])},
        **{i: (0.0, 0.5) for i in [48, 49, 50, 51, 58, 57, 59, 60, 61, 62, 66, 67, 31, 32, 33]},
        **{i: (0.0, 0.3) for i in [30]},
    }),
    # The upper lip follows part of the way, so a long nose does not eat the philtrum.
    "nose_length": _symmetric({30: (0.0, 0.7), 31: (0.0, 1.0), 32: (0.0, 1.0), 33: (0.0, 1.0),
                               **{i: (0.0, 0.4) for i in [48, 49, 50, 51, 60, 61, 62]}}),
    "nose_width": _symmetric({31: (1.0, 0.0), 32: (0.5, 0.0)}),
    "mouth_width": _symmetric({48: (1.0, 0.0), 60: (0.9, 0.0), 49: (0.5, 0.0), 59: (0.5, 0.0)}),
}


# ---------------------------------------------------------------------------
# The source face, found once per process.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _source() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut in gray (float32) and its 68 dlib landmarks (x, y).

    The photo's face smiles with teeth showing; `_closed_mouth` says where the
    lips of a relaxed face would be.
    """
    import cv2
    import dlib
    import face_recognition_models
    from skimage import data

    gray = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)
    faces = dlib.get_frontal_face_detector()(gray, 1)
    if not faces:
        raise RuntimeError("dlib found no face in skimage's astronaut photo; cannot make the demo set")
    face = max(faces, key=lambda r: r.area())
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
    points = np.array([(p.x, p.y) for p in predictor(gray, face).parts()], dtype=np.float64)
    # On this broad smile dlib puts the lower inner lip (65-67) on the lower
    # teeth's upper edge; the lip itself starts a little lower. Moving the
    # points there lets a closed mouth hide all the teeth.
    iod, ex, ey = _face_frame(points)
    points += _to_pixels(_symmetric({67: (0.0, 0.05), 66: (0.0, 0.06), 61: (0.0, -0.015)}), iod, ex, ey)
    return gray.astype(np.float32), points


def _face_frame(points: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """IOD in pixels and the unit vectors along and across the eye line."""
    left, right = points[36:42].mean(0), points[42:48].mean(0)
    iod = float(np.linalg.norm(right - left))
    ex = (right - left) / iod
    return iod, ex, np.array([-ex[1], ex[0]])


def _to_pixels(offsets: np.ndarray, iod: float, ex: np.ndarray, ey: np.ndarray) -> np.ndarray:
    return iod * (offsets[:, :1] * ex + offsets[:, 1:] * ey)


def _closed_mouth(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Landmarks with the photo's smile relaxed and lips closed, and the lip gap it had.

    The jaw closes: the lower lip rises most of the gap, the upper lip drops
    the rest, so the inner lips meet; the corners relax in and down.
    """
    iod, ex, ey = _face_frame(points)
    gap = _lip_gap(points)
    rest = 0.02 * iod  # keep the inner lips a hair apart: coincident points would break the triangulation
    rise, drop = 0.7 * (gap - rest) / iod, 0.3 * (gap - rest) / iod
    spec = _merge(
        {i: (0.0, -rise) for i in [59, 58, 57, 67, 66]},
        {i: (0.0, drop) for i in [61, 62, 50, 51]},
        {49: (0.0, drop * 0.5), 8: (0.0, -rise * 0.6), 7: (0.0, -rise * 0.5), 6: (0.0, -rise * 0.3)},
        _corners(-0.05, 0.05),
    )
    return points + _to_pixels(_symmetric(spec), iod, ex, ey), gap


# Pairs (upper point, lower point, least gap in IOD) that must stay in this
# order down the face. Offsets that add up (a short nose on a long-lipped
# subject, pressed lips on a closed mouth) could otherwise push a lower lid
# above its upper lid; the warp would then fold the skin over itself.
_ORDER: tuple[tuple[int, int, float], ...] = (
    (37, 41, 0.04), (38, 40, 0.04), (43, 47, 0.04), (44, 46, 0.04),  # eyelids
    (19, 37, 0.12), (20, 38, 0.12), (23, 43, 0.12), (24, 44, 0.12),  # brows above eyes
    (31, 49, 0.05), (32, 50, 0.07), (33, 51, 0.07), (34, 52, 0.07), (35, 53, 0.05),  # nose above upper lip
    (50, 61, 0.03), (51, 62, 0.03), (52, 63, 0.03),  # upper lip has thickness
    (61, 67, 0.015), (62, 66, 0.015), (63, 65, 0.015),  # inner lips do not cross
    (67, 58, 0.03), (66, 57, 0.03), (65, 56, 0.03),  # lower lip has thickness
    (57, 8, 0.3),  # chin below the lip
)


def _untangle(points: np.ndarray) -> np.ndarray:
    """Push apart, half each way along the face's vertical, any pair in _ORDER closer than its gap."""
    points = points.copy()
    iod, _, ey = _face_frame(points)
    # Fixing one pair can break its neighbour in a chain (nose, lips, chin),
    # so sweep until none is short; a few sweeps suffice.
    for _ in range(50):
        worst = 0.0
        for upper, lower, gap in _ORDER:
            short = gap * iod - (points[lower] - points[upper]) @ ey
            if short > 1e-3:
                points[upper] -= 0.5 * short * ey
                points[lower] += 0.5 * short * ey
                worst = max(worst, short)
        if worst == 0.0:
            break
    return points


# ---------------------------------------------------------------------------
# Warping
# ---------------------------------------------------------------------------


def _anchors(points: np.ndarray, size: int) -> np.ndarray:
    """Points that never move: a ring around the face and the image border.

    The ring keeps hair, neck and background where they are, so only the face
    deforms; it sits far enough out (jaw +0.5 IOD, brows +1.3 IOD, chin +0.8
    IOD) for the largest identity and expression offsets. The border points lie
    just outside the frame so the triangles cover every pixel.
    """
    iod, _, _ = _face_frame(points)
    x0, x1 = points[:, 0].min(), points[:, 0].max()
    cx, rx = (x0 + x1) / 2, (x1 - x0) / 2 + 0.5 * iod
    cy = points[27:48, 1].mean()
    top = cy - points[17:27, 1].min() + 1.3 * iod
    bottom = points[8, 1] - cy + 0.8 * iod
    t = np.linspace(0, np.pi, 9)[:-1]
    upper = np.column_stack([cx - rx * np.cos(t), cy - top * np.sin(t)])
    lower = np.column_stack([cx + rx * np.cos(t), cy + bottom * np.sin(t)])
    lo, hi = -1.0, size
    s = np.linspace(lo, hi, 6)[:-1]
    border = np.concatenate([
        np.column_stack([s, np.full_like(s, lo)]), np.column_stack([np.full_like(s, hi), s]),
        np.column_stack([s[::-1] + (hi - lo) / 5, np.full_like(s, hi)]),
        np.column_stack([np.full_like(s, lo), s[::-1] + (hi - lo) / 5]),
    ])
    return np.concatenate([upper, lower, border])


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([xx, yy], axis=-1).astype(np.float64)


def _piecewise_affine_map(dst: np.ndarray, src: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel, where to sample the source (cv2.remap maps).

    The map skimage's PiecewiseAffineTransform builds, made fast: skimage
    loops over triangles in Python and scipy's find_simplex walks per pixel
    (0.2-1.5 s per 256x256 image here); drawing each triangle's index with
    OpenCV and evaluating all pixels at once takes a few ms. Triangles are
    Delaunay over the *output* points, so none is folded in the result.
    Small triangles are drawn first and big ones over them, so a squashed
    sliver (closed lips over the photo's teeth) keeps no more than its
    interior; barycentric weights are clipped to the triangle, so a pixel
    that lands in a sliver still samples inside the sliver's source triangle.
    """
    import cv2
    from scipy.spatial import Delaunay

    simplices = Delaunay(dst).simplices
    a, b, c = (dst[simplices[:, k]] for k in range(3))
    edges = np.stack([b - a, c - a], axis=-1)  # (T, 2, 2): columns are the two edges
    det = np.linalg.det(edges)
    order = np.argsort(np.abs(det), kind="stable")

    label = np.full((size, size), -1, np.int32)
    for t in order:
        cv2.fillConvexPoly(label, np.round(dst[simplices[t]] * 16).astype(np.int32), int(t), lineType=cv2.LINE_8, shift=4)
    if (label < 0).any():  # cannot happen with the border anchors; a bug if it does
        raise AssertionError("piecewise-affine triangles do not cover the image")

    # Barycentric weights of every pixel in its triangle; slivers get a tiny
    # determinant instead of zero, and the clip keeps their weights sane.
    safe = np.where(np.abs(det) < 1e-9, 1e-9, det)
    inverse = np.stack([np.stack([edges[:, 1, 1], -edges[:, 0, 1]], -1),
                        np.stack([-edges[:, 1, 0], edges[:, 0, 0]], -1)], axis=1) / safe[:, None, None]
    rel = _pixel_grid(size) - a[label]
    w12 = np.einsum("hwij,hwj->hwi", inverse[label], rel)
    weights = np.clip(np.concatenate([1.0 - w12.sum(-1, keepdims=True), w12], axis=-1), 0.0, 1.0)
    weights /= weights.sum(-1, keepdims=True)
    mapped = np.einsum("hwk,hwkj->hwj", weights, src[simplices[label]])
    return mapped[..., 0].astype(np.float32), mapped[..., 1].astype(np.float32)


def _lip_gap(points: np.ndarray) -> float:
    """Mean opening between the inner lips, in pixels across the eye line."""
    _, _, ey = _face_frame(points)
    return float(np.mean([(points[b] - points[a]) @ ey for a, b in [(61, 67), (62, 66), (63, 65)]]))


def _closed_spline(points: np.ndarray, steps: int = 6) -> np.ndarray:
    """A closed Catmull-Rom curve through `points`, `steps` samples per segment."""
    p0, p1, p2, p3 = (np.roll(points, k, axis=0) for k in (1, 0, -1, -2))
    t = np.linspace(0, 1, steps, endpoint=False)[:, None, None]
    curve = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
    return curve.transpose(1, 0, 2).reshape(-1, 2)


def _shade_mouth(img: np.ndarray, dst: np.ndarray, teeth_gap: float) -> None:
    """Darken an opened mouth, and draw the seam of closed lips, in place.

    Opening the lips wider than the photo's own (teeth-showing) gap only
    stretches teeth; real open mouths are dark inside. Closed lips squash the
    teeth into a bright line, which a dark seam hides.
    """
    import cv2

    gap = _lip_gap(dst)
    # A curve through the 8 inner-lip points: the bare octagon looks cut out.
    inner = np.round(_closed_spline(dst[60:68]) * 16).astype(np.int32)  # 4 bits of sub-pixel precision
    mask = np.zeros(img.shape, np.float32)
    cv2.fillPoly(mask, [inner], 1.0, lineType=cv2.LINE_AA, shift=4)
    mask = cv2.GaussianBlur(mask, (0, 0), 1.0)
    # Up to the photo's own gap the teeth are real; past 1.5 times it, all shadow.
    dark = np.clip((gap - teeth_gap) / (0.5 * teeth_gap), 0.0, 1.0) * 0.9
    if dark > 0:
        img -= dark * mask * (img - 30.0)
    if gap < 0.5 * teeth_gap:
        seam = np.zeros(img.shape, np.float32)
        upper = np.round(dst[[60, 61, 62, 63, 64]] * 16).astype(np.int32)
        cv2.polylines(seam, [upper], False, 1.0, thickness=1, lineType=cv2.LINE_AA, shift=4)
        seam = np.maximum(cv2.GaussianBlur(seam, (0, 0), 0.6) * 1.6, mask)
        img -= 0.55 * np.clip(seam, 0, 1) * (img - 40.0)


def _darken_brows(img: np.ndarray, dst: np.ndarray, iod: float, strength: float) -> None:
    """Darken a soft stroke along each eyebrow, in place.

    The photo's brows are thin and light; in gray, dlib's predictor started
    from an SSD box then puts them on the fringe of the hair, so raised or
    lowered brows went unseen. Fuller brows (a per-subject look, like people's)
    give the brow expressions something the landmarker can follow.
    """
    import cv2

    stroke = np.zeros(img.shape, np.float32)
    # Thickest at the inner end, tapering outwards, as brows grow.
    widths = (0.04, 0.055, 0.065, 0.07)  # outer to inner, for the image-left brow
    for brow, w in ((dst[17:22], widths), (dst[22:27], widths[::-1])):
        for a, b, width in zip(brow[:-1], brow[1:], w):
            cv2.line(stroke, tuple(int(v) for v in np.round(a * 16)), tuple(int(v) for v in np.round(b * 16)), 1.0,
                     thickness=max(1, int(round(width * iod))), lineType=cv2.LINE_AA, shift=4)
    stroke = cv2.GaussianBlur(stroke, (0, 0), 0.03 * iod)
    img -= strength * stroke * (img - 30.0)


# ---------------------------------------------------------------------------
# Subjects and images
# ---------------------------------------------------------------------------


def subject_codes(n: int) -> list[str]:
    """n two-letter codes, ZA, ZB, ..., never a real JAFFE subject's."""
    codes = [a + b for a in "ZYXWVUTSRQP" for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if a + b not in _JAFFE_SUBJECTS]
    if not 1 <= n <= len(codes):
        raise ValueError(f"subjects must be 1..{len(codes)}, got {n}")
    return codes[:n]


def _subject(seed: int, index: int) -> dict:
    """One pseudo-subject's face shape and appearance, from its own RNG stream.

    Seeded by (seed, index), so subject 3 is the same face whether 5 or 10
    subjects are made.
    """
    rng = np.random.default_rng([seed, index])
    shape = sum(np.clip(rng.normal(), -2, 2) * sd * _IDENTITY_BASIS[k] for k, sd in _IDENTITY_SD.items())
    return {
        "shape": shape,  # (68, 2) landmark offsets in IOD
        "zoom": rng.uniform(0.92, 1.08),
        "shift": rng.uniform(-0.03, 0.03, 2),  # fraction of the image size
        "skin": rng.uniform(0.82, 1.15),  # face brightness relative to hair and background
        "brows": rng.uniform(0.25, 0.45),  # how dark the brows are drawn
        "gamma": float(np.exp(rng.normal(0, 0.15))),
        "contrast": rng.uniform(0.8, 1.15),
        "brightness": rng.normal(0, 10),
        "light": (rng.normal(0, 14), rng.uniform(0, 2 * np.pi)),  # side-light gradient amplitude, direction
    }


def _render(expression: str, subject: dict, rng: np.random.Generator, size: int) -> np.ndarray:
    """One 8-bit image: the source face with the subject's shape and the expression."""
    import cv2

    gray, points = _source()
    closed, teeth_gap = _closed_mouth(points)
    iod, ex, ey = _face_frame(points)

    # Head crop: whole head with margin, ~2.4 face widths, centred a bit above
    # the landmarks' centre (the hair is above them). Zoom/shift per subject.
    width = points[:, 0].max() - points[:, 0].min()
    centre = np.array([points[:, 0].mean(), points[:, 1].mean() - 0.2 * width])
    scale = size / (2.4 * width) * subject["zoom"]
    offset = size / 2 + subject["shift"] * size

    def to_out(p: np.ndarray) -> np.ndarray:
        return (p - centre) * scale + offset

    def to_src(p: np.ndarray) -> np.ndarray:
        return (p - offset) / scale + centre

    # Where each landmark goes: the relaxed face + subject shape + expression
    # at this image's intensity, plus a little per-point jitter.
    intensity = rng.uniform(0.8, 1.2)
    offsets = subject["shape"] + intensity * EXPRESSION_OFFSETS[expression] + rng.normal(0, 0.008, (N_POINTS, 2))
    dst = to_out(_untangle(closed + _to_pixels(offsets, iod, ex, ey)))
    anchors = _anchors(to_out(points), size)
    # Source side: the photo's real landmarks; anchors map onto themselves.
    src = np.concatenate([points, to_src(anchors)])
    map_x, map_y = _piecewise_affine_map(np.concatenate([dst, anchors]), src, size)

    # Pre-blur before shrinking so small sizes do not alias.
    sigma = 0.4 / scale if scale < 1 else 0.0
    source = cv2.GaussianBlur(gray, (0, 0), sigma) if sigma > 0.3 else gray
    # A zoomed-out crop may reach past the photo's top: extend the sky there
    # (replicate), since mirroring would copy the hair into the sky.
    img = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    _shade_mouth(img, dst, teeth_gap * scale)
    _darken_brows(img, dst, iod * scale, subject["brows"])

    # Skin tone: scale the face only (a soft hull of jaw and forehead).
    face = np.zeros((size, size), np.float32)
    hull = cv2.convexHull(np.round(np.concatenate([dst[:17], dst[17:27] - 0.5 * iod * scale * ey]) * 16).astype(np.int32))
    cv2.fillConvexPoly(face, hull, 1.0, lineType=cv2.LINE_AA, shift=4)
    face = cv2.GaussianBlur(face, (0, 0), 0.15 * iod * scale)
    img *= 1.0 + (subject["skin"] - 1.0) * face

    amplitude, angle = subject["light"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    img += amplitude * (np.cos(angle) * xx + np.sin(angle) * yy) * 2
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** subject["gamma"]
    img = (img - 128.0) * subject["contrast"] + 128.0 + subject["brightness"]
    img += rng.normal(0, 1.5, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _plan(subjects: int, per_expression: int) -> list[tuple[int, str, str, int, str]]:
    """(subject index, code, expression code, repetition, file name), in running-number order."""
    plan, number = [], 0
    for s, code in enumerate(subject_codes(subjects)):
        for e in EXPRESSION_CODES:
            for rep in range(1, per_expression + 1):
                number += 1
                plan.append((s, code, e, rep, f"{code}.{e}{rep}.{number}.tiff"))
    return plan


def make_demo_dataset(
    out_dir: str | Path, subjects: int = 10, per_expression: int = 3, seed: int = 0, size: int = 256
) -> Path:
    """Write the SYNTHETIC JAFFE-layout demo set to `out_dir` and return it.

    Not JAFFE: pseudo-subjects and posed expressions warped from skimage's
    public-domain astronaut photo (see the module docstring and the README.txt
    written beside the images). Defaults give 10 subjects x 7 expressions x 3 =
    210 images, JAFFE's size. The same arguments give byte-identical files; a
    folder that already holds the complete set for the same arguments is left
    as it is.
    """
    from PIL import Image

    # One digit of repetition, as in JAFFE's names (KA.AN1.39.tiff).
    if not 1 <= per_expression <= 9 or size < 64:
        raise ValueError("per_expression must be 1..9 and size >= 64")
    out = Path(out_dir)
    params = {"generator": "ferpipe.demo.synthetic", "version": GENERATOR_VERSION, "subjects": subjects,
              "per_expression": per_expression, "seed": seed, "size": size}
    plan = _plan(subjects, per_expression)
    params_file = out / "params.json"
    if params_file.is_file():
        try:
            previous = json.loads(params_file.read_text())
        except ValueError:
            previous = None
        if previous == params and all((out / name).is_file() for *_, name in plan):
            log.info(f"demo data: {out} already holds the set, skipping")
            return out
        # Ours but for other parameters: remove its images so no stale file
        # joins the new set. Only names of our pattern are touched.
        params_file.unlink()
        for path in out.glob("*.tiff"):
            if _FILE_RE.match(path.name):
                path.unlink()

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subject_params = [_subject(seed, s) for s in range(subjects)]
    exp_index = {e: i for i, e in enumerate(EXPRESSION_CODES)}
    for s, _code, e, rep, name in progress_bar(plan, desc="demo data (synthetic)", unit="img"):
        rng = np.random.default_rng([seed, s, exp_index[e], rep])  # per image, independent of the set's size
        img = _render(EXPRESSION_CODES[e], subject_params[s], rng, size)
        Image.fromarray(img).save(out / name, format="TIFF")

    codes = subject_codes(subjects)
    (out / "README.txt").write_text(README.format(
        version=GENERATOR_VERSION, subjects=subjects, per_expression=per_expression, seed=seed, size=size,
        codes=f"{codes[0]}..{codes[-1]}" if len(codes) > 1 else codes[0]))
    # Written last: its presence means the set is complete.
    params_file.write_text(json.dumps(params, indent=2) + "\n")
    log.info(f"demo data: {len(plan)} synthetic images in {out} ({time.perf_counter() - start:.1f} s)")
    return out


if __name__ == "__main__":
    make_demo_dataset(sys.argv[1] if len(sys.argv) > 1 else "data/demo-synthetic")
