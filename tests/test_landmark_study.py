"""The landmark study: phase 1's landmark head put back before and after fine-tuning (paper V-B, figure 10)."""

from __future__ import annotations

import numpy as np
import pytest
from science_fixtures import write_dataset

from ferpipe.crossval.train_eval import load_fold
from ferpipe.evaluate.landmark_study import combine_studies, landmark_study, member_study
from ferpipe.model.profiles import SMOKE
from ferpipe.model.training import LANDMARK_FILE, ensemble_members, train_member
from ferpipe.preprocess.imaging import decode_png


@pytest.fixture(scope="module")
def fold(tmp_path_factory):
    return load_fold(write_dataset(tmp_path_factory.mktemp("synthetic"), subjects=10, per_class=2, folds=5), 0, SMOKE)


@pytest.fixture(scope="module")
def trained(fold, tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    members = ensemble_members("el", seed=3)[:2]  # eyebrows and eyes: enough to tile two parts
    return root, [train_member(m, fold.train, fold.val, SMOKE, root / m.slot, progress=lambda line: None)
                  for m in members]


def test_training_keeps_phase_ones_best_landmark_network(fold, trained):
    root, (eyebrows, _) = trained
    assert (root / "eyebrows" / LANDMARK_FILE).is_file()
    study = member_study("eyebrows", eyebrows.landmark_weights, eyebrows.model, fold.val)
    # Before fine-tuning the study must see exactly the network phase 1 kept: its best validation L1.
    best = min(row["val_loss"] for row in eyebrows.history if row["phase"] == "landmarks")
    assert study["before"] == pytest.approx(best, rel=1e-4)
    assert study["after"] != pytest.approx(study["before"], rel=1e-6)  # fine-tuning moved the extractor
    assert study["points"] == 10 and study["images"] == len(fold.val)


def test_a_resumed_complete_member_returns_the_same_landmark_network(fold, trained):
    root, (eyebrows, _) = trained
    again = train_member(eyebrows.member, fold.train, fold.val, SMOKE, root / "eyebrows", progress=lambda line: None)
    assert all(np.array_equal(a, b) for a, b in zip(again.landmark_weights, eyebrows.landmark_weights))


def test_baseline_members_have_no_landmark_network(fold, tmp_path):
    member = ensemble_members("baseline")[0]
    trained = train_member(member, fold.train, fold.val, SMOKE, tmp_path, progress=lambda line: None)
    assert trained.landmark_weights is None and not (tmp_path / LANDMARK_FILE).exists()
    assert landmark_study({member.slot: None}, {member.slot: None}, {member.slot: trained.model}, fold.test) is None


def test_study_of_a_fold_writes_figure_ten_and_combines_over_folds(fold, trained, tmp_path):
    _, members = trained
    slots = {t.member.slot: t for t in members}
    study = landmark_study({s: t.member.part for s, t in slots.items()}, {s: t.landmark_weights for s, t in slots.items()},
                           {s: t.model for s, t in slots.items()}, fold.test, tmp_path / "study.png", max_images=3)
    assert set(study["members"]) == {"eyebrows", "eyes"} and study["images"] == len(fold.test)
    for row in study["members"].values():
        assert 0 < row["before"] < 1 and 0 < row["after"] < 1 and 0 < row["mean_face"] < 1
    picture = decode_png((tmp_path / "study.png").read_bytes())
    assert picture.shape[0] == 3 * (18 + 144) and picture.shape[1] == 3 * 144  # 3 faces x (dlib, before, after)
    half = {**study, "images": 4, "members": {k: {**v, "images": 4, "before": 0.0} for k, v in study["members"].items()}}
    combined = combine_studies([study, None, half])
    eyes = combined["members"]["eyes"]
    assert eyes["images"] == len(fold.test) + 4
    assert eyes["before"] == pytest.approx(study["members"]["eyes"]["before"] * len(fold.test) / (len(fold.test) + 4))
