import numpy as np

from ferpipe.data.parts import ENSEMBLE_PARTS, FLIP_PERMUTATION, N_POINTS, PARTS, part_outputs, part_slice


def test_parts_cover_the_68_points_once():
    covered = np.concatenate([np.arange(N_POINTS)[s] for s in PARTS.values()])
    assert sorted(covered.tolist()) == list(range(N_POINTS))
    assert ENSEMBLE_PARTS == ("eyebrows", "eyes", "nose", "mouth", "jaw")


def test_outputs_per_part_match_design():
    expected = {"jaw": 34, "eyebrows": 20, "nose": 18, "eyes": 24, "mouth": 40, "full": 136}
    assert {p: part_outputs(p) for p in expected} == expected


def test_flip_permutation_is_an_involution_that_keeps_parts():
    assert (FLIP_PERMUTATION[FLIP_PERMUTATION] == np.arange(N_POINTS)).all()
    for piece in PARTS.values():
        indices = set(range(piece.start, piece.stop))
        assert {int(FLIP_PERMUTATION[i]) for i in indices} == indices


def test_flip_swaps_left_and_right_eye_and_fixes_the_midline():
    assert FLIP_PERMUTATION[36] == 45 and FLIP_PERMUTATION[39] == 42
    for midline in (8, 27, 28, 29, 30, 33, 51, 57, 62, 66):
        assert FLIP_PERMUTATION[midline] == midline


def test_unknown_part_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown part"):
        part_slice("ears")
