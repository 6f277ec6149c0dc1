"""The fused single-graph ensemble predicts what the five models do separately."""

from __future__ import annotations

import numpy as np
import pytest

from ferpipe.model.ensemble import ensemble_probabilities, predict_members
from ferpipe.model.export import MEMBER_PROBABILITIES, PROBABILITIES, build_ensemble_model, load_ensemble, save_ensemble
from ferpipe.model.networks import build_classifier, infer
from tests.serving_fixtures import real_members

SIZE = 32


@pytest.fixture(scope="module")
def members():
    return real_members(SIZE, 3, name="same_name")  # clashing names must not matter


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 255, (6, SIZE, SIZE, 3), dtype=np.uint8)


# Keras' own variable saving trips numpy 2's copy-keyword deprecation; not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_single_graph_equals_separate_models(members, images, tmp_path_factory):
    fused = build_ensemble_model(members)
    separate = predict_members(members, images)
    outputs = fused.predict(images.astype(np.float32) / 127.5 - 1, verbose=0)
    np.testing.assert_allclose(outputs[PROBABILITIES], ensemble_probabilities(separate), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[MEMBER_PROBABILITIES], separate.transpose(1, 0, 2), rtol=1e-5, atol=1e-6)

    path = save_ensemble(fused, tmp_path_factory.mktemp("export") / "ensemble.keras")
    reloaded = load_ensemble(path)
    again = infer(reloaded, images.astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(again[PROBABILITIES] if isinstance(again, dict) else again,
                               outputs[PROBABILITIES], rtol=1e-5, atol=1e-6)


def test_members_must_agree(members):
    with pytest.raises(ValueError):
        build_ensemble_model([*members[:4], build_classifier(4, SIZE)])
    with pytest.raises(ValueError):
        build_ensemble_model(members[:3])
