"""The architecture of DESIGN.md section 5, checked by its parameter counts."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from ferpipe.data.parts import PARTS, part_outputs
from ferpipe.model.networks import (
    build_classifier,
    build_extractor,
    build_landmark_network,
    build_subnetwork,
    extractor_of,
    infer,
)


def test_extractor_has_the_papers_parameter_count():
    assert build_extractor().count_params() == 295_440


@pytest.mark.parametrize(("classes", "parameters"), [(7, 329_367), (8, 329_496)])
def test_subnetwork_has_the_papers_parameter_count(classes, parameters):
    assert build_classifier(classes).count_params() == parameters


def test_landmark_networks_regress_each_parts_points():
    extractor = build_extractor(32)
    for part in [*PARTS, "full"]:
        outputs = part_outputs(part)
        model = build_landmark_network(extractor, outputs)
        assert model.output_shape == (None, outputs)
        assert model.count_params() == 295_440 + (128 * 128 + 128) + (128 * outputs + outputs)
        assert model.layers[-1].layers[-1].activation.__name__ == "linear"


def test_the_extractor_is_the_papers_blocks():
    extractor = build_extractor()
    convs = [l for l in extractor.layers if isinstance(l, keras.layers.Conv2D)]
    pools = [l for l in extractor.layers if isinstance(l, keras.layers.MaxPooling2D)]
    assert [c.filters for c in convs] == [16, 16, 32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == "same" for c in convs)
    assert all(type(c.kernel_initializer).__name__ == "HeUniform" for c in convs)
    assert all(p.pool_size == (3, 3) and p.strides == (2, 2) and p.padding == "same" for p in pools)
    assert len(pools) == 4 and extractor.output_shape == (None, 128)


def test_input_size_is_configurable_and_does_not_change_the_count():
    model = build_classifier(7, input_size=48)
    assert model.count_params() == 329_367
    x = np.random.default_rng(0).uniform(-1, 1, (3, 48, 48, 3)).astype(np.float32)
    probabilities = infer(model, x, batch_size=2)
    assert probabilities.shape == (3, 7)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities, model.predict(x, verbose=0), rtol=1e-4, atol=1e-6)


def test_heads_share_the_extractor():
    extractor = build_extractor(32)
    landmarks = build_landmark_network(extractor, 40)
    classifier = build_subnetwork(extractor, 7)
    assert extractor_of(landmarks) is extractor_of(classifier) is extractor
