"""Stage 7's rule: sum the softmax vectors class-wise, take the argmax."""

from __future__ import annotations

import numpy as np
import pytest

from ferpipe.model.ensemble import ensemble_predictions, ensemble_probabilities, member_predictions, predict_members
from ferpipe.model.networks import build_classifier


def test_the_sum_not_the_vote_decides():
    # Two members lean to class 1, one is sure of class 0: a vote says 1, the sum says 0.
    probabilities = np.array([[[0.9, 0.1]], [[0.45, 0.55]], [[0.4, 0.6]]])
    assert member_predictions(probabilities).tolist() == [[0], [1], [1]]
    np.testing.assert_allclose(ensemble_probabilities(probabilities), [[1.75, 1.25]])
    assert ensemble_predictions(probabilities).tolist() == [0]


def test_several_images_and_a_tie():
    probabilities = np.array([
        [[0.2, 0.5, 0.3], [0.5, 0.5, 0.0]],
        [[0.1, 0.1, 0.8], [0.5, 0.5, 0.0]],
    ])
    assert ensemble_predictions(probabilities).tolist() == [2, 0]  # a tie goes to the first class
    assert member_predictions(probabilities).tolist() == [[1, 0], [2, 0]]


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        ensemble_probabilities(np.zeros((4, 3)))


def test_predict_members_stacks_each_models_softmax():
    models = [build_classifier(3, input_size=32) for _ in range(2)]
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    probabilities = predict_members(models, images, batch_size=2)
    assert probabilities.shape == (2, 5, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
