"""A real exported final model for the serving tests: five real sub-networks (untrained, seeded), fused, saved.

Untrained weights keep the tests to seconds; what they check (every image
gets a row with the right status, the served answer is the stages plus the
graph, the registry's champion rule) does not depend on how well it learned.
BatchNorm statistics are set away from the identity so inference mode matters.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.model.export import build_ensemble_model
from ferpipe.model.networks import build_classifier
from ferpipe.preprocess.chain import PreprocessSettings
from ferpipe.serving.limits import ServingLimits
from ferpipe.serving.pyfunc import save_pyfunc, serving_info

CLASSES = ("happy", "neutral")
INPUT_SIZE = 32  # below the 160 crop: the served model must resize as training did


def real_members(size: int = INPUT_SIZE, classes: int = len(CLASSES), name: str | None = None) -> list[keras.Model]:
    """Five seeded, untrained sub-networks with non-trivial BatchNorm statistics (inference mode is exercised);
    `name` gives them all one name, to show that clashing names do not matter."""
    members = []
    for seed, slot in enumerate(ENSEMBLE_PARTS):
        keras.utils.set_random_seed(seed)
        model = build_classifier(classes, size, name=name or slot)
        rng = np.random.default_rng(seed)
        for layer in model.get_layer("extractor").layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
                layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
        members.append(model)
    return members


def export_model(out: Path, limits: ServingLimits = ServingLimits()) -> tuple[Path, list[keras.Model]]:
    members = real_members()
    graph = build_ensemble_model(members)
    info = serving_info(CLASSES, ENSEMBLE_PARTS, "el", INPUT_SIZE, PreprocessSettings(), limits, dataset="test")
    return save_pyfunc(graph, info, out), members


def gradient_png(size: int = 200) -> bytes:
    """A smooth gray ramp: decodes fine, holds no face."""
    import cv2

    ramp = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    return cv2.imencode(".png", ramp)[1].tobytes()
