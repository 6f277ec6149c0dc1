"""The facial parts of the dlib/iBUG 68-point scheme, the one table used everywhere.

Slices are 0-based and end-exclusive. `FLIP_PERMUTATION[i]` is the index that
point i becomes after a horizontal flip: without it, index 36 would mean the
subject's right eye corner in one image and the left one in its mirror.
"""

from __future__ import annotations

import numpy as np

N_POINTS = 68

# Order is the order of the five ensemble members in every table and DAG.
PARTS: dict[str, slice] = {
    "eyebrows": slice(17, 27),
    "eyes": slice(36, 48),
    "nose": slice(27, 36),
    "mouth": slice(48, 68),
    "jaw": slice(0, 17),
}
FULL = slice(0, N_POINTS)
ENSEMBLE_PARTS: tuple[str, ...] = tuple(PARTS)


def part_slice(name: str) -> slice:
    """The point slice of a part name, `full` included."""
    if name == "full":
        return FULL
    try:
        return PARTS[name]
    except KeyError:
        raise ValueError(f"unknown part {name!r}; expected one of {', '.join([*PARTS, 'full'])}") from None


def part_outputs(name: str) -> int:
    """Regression outputs of a part's landmark head: x and y per point."""
    s = part_slice(name)
    return 2 * (s.stop - s.start)


def _mirror_pairs() -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    pairs += [(i, 16 - i) for i in range(8)]  # jaw 0..16, 8 is the chin
    pairs += [(17 + i, 26 - i) for i in range(5)]  # eyebrows
    pairs += [(31, 35), (32, 34)]  # nostrils; 27-30 is the bridge, 33 the tip
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (59, 55), (58, 56)]  # outer lip
    pairs += [(60, 64), (61, 63), (67, 65)]  # inner lip
    return pairs


def _flip_permutation() -> np.ndarray:
    perm = np.arange(N_POINTS)
    for a, b in _mirror_pairs():
        perm[a], perm[b] = b, a
    return perm


FLIP_PERMUTATION: np.ndarray = _flip_permutation()
