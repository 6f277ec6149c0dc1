"""Stage 7: the ensemble's decision. Each member's softmax, summed class-wise, argmax.

Probabilities are arrays shaped (members, images, classes). Summing rather
than voting lets a confident member outweigh two unsure ones, which is the
paper's rule. On an exact tie argmax takes the class listed first.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ferpipe.model.augment import to_network_input
from ferpipe.model.networks import infer


def ensemble_probabilities(member_probabilities: np.ndarray) -> np.ndarray:
    """(members, images, classes) -> (images, classes): the class-wise sum."""
    probabilities = np.asarray(member_probabilities, dtype=np.float64)
    if probabilities.ndim != 3:
        raise ValueError(f"expected (members, images, classes), got shape {probabilities.shape}")
    return probabilities.sum(axis=0)


def ensemble_predictions(member_probabilities: np.ndarray) -> np.ndarray:
    """(members, images, classes) -> (images,) class index the ensemble picks."""
    return ensemble_probabilities(member_probabilities).argmax(axis=-1)


def member_predictions(member_probabilities: np.ndarray) -> np.ndarray:
    """(members, images, classes) -> (members, images): what each member alone would pick."""
    return np.asarray(member_probabilities).argmax(axis=-1)


def predict_members(models: Sequence, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run each member on uint8 crops (at the members' input size); (members, images, classes) float32."""
    inputs = to_network_input(images)
    return np.stack([infer(model, inputs, batch_size) for model in models])
