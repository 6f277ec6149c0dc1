"""Scores, confusion matrices, Table I and the cross-dataset rule."""

from __future__ import annotations

import numpy as np
import pytest

from ferpipe.data.parts import ENSEMBLE_PARTS
from ferpipe.evaluate.scoring import (
    accuracy,
    combine_folds,
    confusion_matrix,
    cross_dataset_labels,
    evaluate_cross_dataset,
    evaluate_predictions,
    markdown_table,
    results_table,
    save_confusion,
    write_table,
)


def one_hot(indices, classes):
    return np.eye(classes)[indices]


def fold_probabilities(labels, member_picks, classes=3):
    """(5, images, classes) probabilities where member m picks member_picks[m] confidently."""
    return np.stack([0.1 + 0.7 * one_hot(p, classes) for p in member_picks])


def test_accuracy_and_confusion():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    m = confusion_matrix([0, 1, 2, 2], [0, 1, 1, 2], 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # rows true, columns predicted


def test_fold_and_overall_scores():
    labels = np.array([0, 1, 2, 2])
    picks = [[0, 1, 2, 2], [0, 1, 2, 0], [0, 0, 0, 0], [1, 1, 2, 2], [0, 1, 2, 2]]
    fold = evaluate_predictions(labels, fold_probabilities(labels, picks))
    assert list(fold["accuracy"]) == [*ENSEMBLE_PARTS, "ensemble"]
    assert fold["accuracy"]["eyebrows"] == 1.0 and fold["accuracy"]["nose"] == 0.25
    assert fold["accuracy"]["ensemble"] == 1.0
    small = evaluate_predictions(np.array([0]), fold_probabilities([0], [[1]] * 5))
    overall = combine_folds([fold, small])
    assert overall["images"] == 5
    assert overall["accuracy"]["ensemble"] == pytest.approx(4 / 5)  # pooled over images
    assert overall["mean_fold_accuracy"]["ensemble"] == pytest.approx(0.5)  # mean of folds
    assert np.sum(overall["confusion"]["ensemble"]) == 5


def test_confusion_files(tmp_path):
    png, csv = save_confusion(np.array([[3, 1], [0, 4]]), ["happy", "neutral"], tmp_path / "c" / "ensemble", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert csv.read_text().splitlines() == ["true \\ predicted,happy,neutral", "happy,3,1", "neutral,0,4"]


def test_table_one_layout(tmp_path):
    table = results_table({
        "el": {**{p: 0.9 for p in ENSEMBLE_PARTS}, "ensemble": 0.97},
        "baseline": {**{p: 0.8 for p in ENSEMBLE_PARTS}, "ensemble": 0.85},
    })
    assert list(table.index) == ["Baseline", "EL"]  # the paper's row order
    assert list(table.columns) == ["eyebrows", "eyes", "nose", "mouth", "jaw", "ensemble"]
    assert table.loc["EL", "ensemble"] == pytest.approx(97.0)
    md = markdown_table(table)
    assert md.splitlines()[0] == "| network | eyebrows | eyes | nose | mouth | jaw | ensemble |"
    assert "| EL | 90.00 | 90.00 | 90.00 | 90.00 | 90.00 | 97.00 |" in md
    csv, md_path = write_table(table, tmp_path / "table")
    assert csv.exists() and md_path.read_text() == md


def test_cross_dataset_maps_by_name_and_drops_unknown_classes():
    train = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")  # SFEW: no contempt
    test = ["happy", "contempt", "Sad", "contempt", "angry"]
    keep, mapped = cross_dataset_labels(train, test)
    assert keep.tolist() == [True, False, True, False, True]
    assert mapped.tolist() == [3, 5, 0]
    probabilities = np.stack([one_hot([3, 0, 5, 1, 0], 7)] * 5)
    result = evaluate_cross_dataset(probabilities, test, train)
    assert result["images"] == 3 and result["accuracy"]["ensemble"] == 1.0
    assert result["dropped"] == {"contempt": 2}
    with pytest.raises(ValueError):
        evaluate_cross_dataset(probabilities[..., :6], test, train)
